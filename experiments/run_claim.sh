#!/usr/bin/env bash
# The small-scale test of ProSeCo's central claim (docs/results.md): a ProSeCo-trained model matches
# the MDLM-trained model's best sample quality with fewer NFEs, and beats it at equal NFE.
#
#   experiments/run_claim.sh [all|data|train|sweep|report] [moses|shakespeare ...]
#
# Stages (each is idempotent, so rerunning the same command continues where it stopped):
#   data   tokenizers + shards under data/claim/ (skipped when the manifest exists)
#   train  the MDLM and the ProSeCo model of each corpus (runs/claim/NAME; resumes from the latest
#          checkpoint, a finished run returns at once)
#   sweep  validation metrics of every model (runs/claim/eval-NAME.json), then samples every model
#          over steps x corrector settings -> runs/claim/sweep-CORPUS/ (sweep.csv, sweep.md,
#          sweep.png); a finished per-model sweep is not redone
#   report runs/claim/claim-CORPUS.md: training cost of both runs and the claim's comparisons
#
# Environment:
#   JOBS=2          training runs / per-model sweeps at once (each with THREADS threads)
#   THREADS=1       OMP threads per process (JOBS x THREADS should match the cores)
#   NUM_SAMPLES     samples per grid point (default 256 for MOSES, 64 for Shakespeare)
#   OMEGAS=1        corrector frequencies omega to sweep, e.g. 1,2 (each omega adds a grid per S > 0)
#   TRAIN_OVERRIDES extra section.field=value overrides for every training run (e.g. train.max_steps=100)
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=${1:-all}
shift || true
CORPORA=${*:-moses shakespeare}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
PROSECO=${PROSECO:-.venv/bin/proseco}
export OMP_NUM_THREADS=$THREADS

data() {
  local corpus=$1
  case $corpus in
    moses)  # MOSES molecules of at most 30 characters (208k train, 23k val); one per 32-token sample
      local dir=data/claim/moses30
      [[ -f $dir/shards/manifest.json ]] && return
      $PROSECO tokenizer train --corpus moses --max-chars 30 --kind char --out $dir/tokenizer --overwrite
      $PROSECO tokenizer shard --corpus moses --max-chars 30 --tokenizer $dir/tokenizer --seq-len 32 \
        --packing pad --out $dir/shards --overwrite ;;
    shakespeare)  # the plays as characters, packed into 64-character samples
      local dir=data/claim/shakespeare-char
      [[ -f $dir/shards/manifest.json ]] && return
      $PROSECO tokenizer train --corpus shakespeare --kind char --out $dir/tokenizer --overwrite
      $PROSECO tokenizer shard --corpus shakespeare --tokenizer $dir/tokenizer --seq-len 64 \
        --packing pack --out $dir/shards --overwrite ;;
    *) echo "unknown corpus $corpus (moses, shakespeare)" >&2; exit 2 ;;
  esac
}

train_one() {  # NAME: one training run, logged to runs/claim/NAME.log; wall seconds in NAME.seconds
  local name=$1 start
  mkdir -p runs/claim
  [[ -f runs/claim/$name/.done ]] && return
  echo "train $name (log runs/claim/$name.log)"
  start=$(date +%s)
  # shellcheck disable=SC2086
  $PROSECO train experiments/configs/$name.yaml ${TRAIN_OVERRIDES:-} >> runs/claim/$name.log 2>&1
  # Appended per invocation: a run resumed after an interruption sums its sittings.
  echo $(( $(date +%s) - start )) >> runs/claim/$name.seconds
  touch runs/claim/$name/.done
}

sweep_one() {  # CORPUS NAME: the grid for one model
  local corpus=$1 name=$2 samples steps corrector
  # Samples x forwards is the cost: 256 molecules of 32 tokens, 64 Shakespeare samples of 64 characters.
  if [[ $corpus == moses ]]; then samples=${NUM_SAMPLES:-256}; steps=4,8,16,32,64; corrector=0,1,2,4
  else samples=${NUM_SAMPLES:-64}; steps=8,16,32,64; corrector=0,1,2; fi
  local out=runs/claim/sweep-$corpus/$name
  [[ -f $out/sweep.csv ]] && return
  echo "eval $name -> runs/claim/eval-$name.json"
  $PROSECO eval --checkpoint runs/claim/$name --batches 64 --out runs/claim/eval-$name.json \
    > runs/claim/eval-$name.log 2>&1
  echo "sweep $name -> $out"
  $PROSECO sweep --checkpoint runs/claim/$name --steps $steps --corrector-steps $corrector \
    --corrector-every "${OMEGAS:-1}" --num-samples "$samples" --batch-size "$samples" --out "$out" \
    > runs/claim/sweep-$corpus-$name.log 2>&1
}

# Longest runs first, so JOBS parallel lanes finish close together.
names() { for corpus in $CORPORA; do echo "$corpus-proseco"; done; for corpus in $CORPORA; do echo "$corpus-mdlm"; done; }

export -f train_one sweep_one
export PROSECO TRAIN_OVERRIDES NUM_SAMPLES OMEGAS

if [[ $STAGE == all || $STAGE == data ]]; then
  for corpus in $CORPORA; do data "$corpus"; done
fi
if [[ $STAGE == all || $STAGE == train ]]; then
  start=$(date +%s)
  names | xargs -P "$JOBS" -I{} bash -c 'train_one {}'
  echo "training done in $(( $(date +%s) - start )) s"
fi
if [[ $STAGE == all || $STAGE == sweep ]]; then
  for corpus in $CORPORA; do
    start=$(date +%s)
    printf '%s\n' "$corpus-mdlm" "$corpus-proseco" | xargs -P "$JOBS" -I{} bash -c "sweep_one $corpus {}"
    $PROSECO sweep --merge runs/claim/sweep-$corpus/$corpus-mdlm runs/claim/sweep-$corpus/$corpus-proseco \
      --out runs/claim/sweep-$corpus
    echo "sweep of $corpus done in $(( $(date +%s) - start )) s"
  done
fi
if [[ $STAGE == all || $STAGE == sweep || $STAGE == report ]]; then
  for corpus in $CORPORA; do
    .venv/bin/python -m experiments.claim_report --corpus "$corpus" --runs runs/claim --out runs/claim/claim-$corpus.md
  done
fi
