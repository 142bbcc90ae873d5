#!/usr/bin/env bash
# The small-scale test of ProSeCo's central claim (docs/results.md): a ProSeCo-trained model matches
# the MDLM-trained model's best sample quality with fewer NFEs, and beats it at equal NFE.
#
#   experiments/run_claim.sh [all|data|train|sweep|report] [moses|shakespeare ...]
#
# Stages (each is idempotent, so rerunning the same command continues where it stopped):
#   data   tokenizers + shards under data/claim/ (skipped when the manifest exists)
#   train  the MDLM and the ProSeCo model of each corpus ($RUNS/NAME; resumes from the latest
#          checkpoint, a finished run returns at once)
#   sweep  validation metrics of every model ($RUNS/eval-NAME.json), then samples every model over
#          steps x corrector settings -> $RUNS/sweep-CORPUS[-pP]/ (sweep.csv, sweep.md, sweep.png),
#          once per nucleus p; the ProSeCo checkpoint at half the steps (kept by checkpoint.keep_every)
#          is swept too, as CORPUS-proseco@STEP: it cost the MDLM run's training FLOPs. A finished
#          per-model sweep is not redone
#   report $RUNS/claim-CORPUS[-pP].md: training cost of the runs and the claim's comparisons
#
# Environment:
#   RUNS=runs/claim folder of the runs, evaluations, sweeps and reports
#   JOBS=2          training runs / per-model sweeps at once (each with THREADS threads)
#   THREADS=1       OMP threads per process (JOBS x THREADS should match the cores)
#   NUM_SAMPLES     samples per grid point (default 256 for MOSES, 64 for Shakespeare)
#   NUCLEUS=1.0     nucleus (top-p) values to sweep, e.g. 1.0,0.9 (1.0: the official molecule evaluation;
#                   0.9: the official OWT evaluation)
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
RUNS=${RUNS:-runs/claim}
NUCLEUS=${NUCLEUS:-1.0}
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

train_one() {  # NAME: one training run, logged to $RUNS/NAME.log; wall seconds in NAME.seconds
  local name=$1 start
  mkdir -p "$RUNS"
  [[ -f $RUNS/$name/.done ]] && return
  echo "train $name (log $RUNS/$name.log)"
  start=$(date +%s)
  # shellcheck disable=SC2086
  $PROSECO train experiments/configs/$name.yaml logging.run_dir="$RUNS/$name" ${TRAIN_OVERRIDES:-} \
    >> "$RUNS/$name.log" 2>&1
  # Appended per invocation: a run resumed after an interruption sums its sittings.
  echo $(( $(date +%s) - start )) >> "$RUNS/$name.seconds"
  touch "$RUNS/$name/.done"
}

sweep_dir() {  # CORPUS P: the sweep folder of one nucleus value (plain for p = 1)
  if [[ $2 == 1 || $2 == 1.0 ]]; then echo "$RUNS/sweep-$1"; else echo "$RUNS/sweep-$1-p$2"; fi
}

sweep_one() {  # CORPUS P LABEL CHECKPOINT GRID: one model at one nucleus value; GRID main or tail
  local corpus=$1 p=$2 label=$3 checkpoint=$4 grid=$5 samples steps corrector out
  # Samples x forwards is the cost: 256 molecules of 32 tokens, 64 Shakespeare samples of 64 characters.
  if [[ $corpus == moses ]]; then samples=${NUM_SAMPLES:-256}; steps=4,8,16,32,64; corrector=0,1,2,4
  else samples=${NUM_SAMPLES:-64}; steps=8,16,32,64; corrector=0,1,2; fi
  out=$(sweep_dir "$corpus" "$p")/$label
  if [[ $grid == tail ]]; then
    # Plain sampling with T beyond the sequence length: with the cache its NFE saturates there, so
    # these points are the plain sampler's best whatever the NFE budget (cheap: no corrector).
    steps=128,256; corrector=0; out=$out-tail
  fi
  [[ -f $out/sweep.csv ]] && return
  mkdir -p "$(dirname "$out")"
  echo "sweep $label $grid (nucleus $p) -> $out"
  $PROSECO sweep --checkpoint "$checkpoint" --label "$label" --steps $steps --corrector-steps $corrector \
    --corrector-every "${OMEGAS:-1}" --nucleus-p "$p" --num-samples "$samples" --batch-size "$samples" \
    --out "$out" > "$out.log" 2>&1
}

eval_one() {  # NAME: validation NELBO and corrector loss of a finished run
  [[ -f $RUNS/eval-$1.json ]] && return
  echo "eval $1 -> $RUNS/eval-$1.json"
  $PROSECO eval --checkpoint "$RUNS/$1" --batches 64 --out "$RUNS/eval-$1.json" > "$RUNS/eval-$1.log" 2>&1
}

sweep_jobs() {  # CORPUS: one line per sweep "corpus p label checkpoint grid", the longest first
  local corpus=$1 p half
  half=$(( $(sed -n 's/^  max_steps: *//p' "$RUNS/$corpus-proseco/config.yaml") / 2 ))
  local kept=$RUNS/$corpus-proseco/checkpoints/$(printf 'step_%08d' "$half")
  for p in ${NUCLEUS//,/ }; do
    echo "$corpus $p $corpus-proseco $RUNS/$corpus-proseco main"
    echo "$corpus $p $corpus-mdlm $RUNS/$corpus-mdlm main"
    [[ -d $kept ]] && echo "$corpus $p $corpus-proseco@$half $kept main"
    for name in "$corpus-mdlm" "$corpus-proseco"; do echo "$corpus $p $name $RUNS/$name tail"; done
    [[ -d $kept ]] && echo "$corpus $p $corpus-proseco@$half $kept tail"
  done
}

# Longest runs first, so JOBS parallel lanes finish close together.
names() { for corpus in $CORPORA; do echo "$corpus-proseco"; done; for corpus in $CORPORA; do echo "$corpus-mdlm"; done; }

export -f train_one sweep_one sweep_dir eval_one
export PROSECO RUNS TRAIN_OVERRIDES NUM_SAMPLES OMEGAS

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
    printf '%s\n' "$corpus-mdlm" "$corpus-proseco" | xargs -P "$JOBS" -I{} bash -c 'eval_one {}'
    sweep_jobs "$corpus" | xargs -P "$JOBS" -L1 bash -c 'sweep_one "$@"' _
    for p in ${NUCLEUS//,/ }; do
      dir=$(sweep_dir "$corpus" "$p")
      # shellcheck disable=SC2046
      $PROSECO sweep --merge $(find "$dir" -mindepth 2 -maxdepth 2 -name sweep.csv -printf '%h\n' | sort) --out "$dir" \
        --title "$corpus, nucleus p = $p" > "$dir.log" 2>&1
    done
    echo "sweep of $corpus done in $(( $(date +%s) - start )) s"
  done
fi
if [[ $STAGE == all || $STAGE == sweep || $STAGE == report ]]; then
  for corpus in $CORPORA; do
    for p in ${NUCLEUS//,/ }; do
      dir=$(sweep_dir "$corpus" "$p")
      .venv/bin/python -m experiments.claim_report --corpus "$corpus" --runs "$RUNS" --sweep "$dir/sweep.csv" \
        --out "$RUNS/claim-${dir##*/sweep-}.md"
    done
  done
fi
