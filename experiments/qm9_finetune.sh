#!/usr/bin/env bash
# E1, the paper's fine-tuning protocol on QM9 (docs/results.md): does continuing a strong MDLM with
# the ProSeCo objective buy the same quality for fewer NFEs (or better quality) than continuing it
# with MDLM for as many steps? The verdict rules are in experiments/finetune_report.py, written
# before the run.
#
#   experiments/qm9_finetune.sh [all|data|train|select|report|export|import]
#
# Runs (each resumes from its own checkpoints when the command is run again):
#   base       MDLM, BASE_STEPS (10,000) steps, warm-up then constant lr, dropout 0.1
#   mdlm       branch A: base continued with MDLM to BASE_STEPS + 2 x MORE_STEPS (18,000); its
#              checkpoint at BASE_STEPS + MORE_STEPS (14,000) is kept. A@14k has B's steps, A@18k its
#              training FLOPs (an MDLM step costs 3 forward-equivalents per sample, ProSeCo's 6). The
#              lr is constant after warm-up, so A@14k is no mid-schedule checkpoint of an annealed run
#   proseco    branch B: base continued with ProSeCo (corrector input CORRECTOR_INPUT) to 14,000
# Stages (each idempotent):
#   data    the qm9 tokenizer and shards (as `make data`)
#   train   base, then A and B side by side
#   select  seed SELECT_SEED, SELECT_SAMPLES samples per point: plain sampling at T in PLAIN_STEPS
#           for every model, ProSeCo at T x S x omega (the fast regime) for B, nucleus p = 1.0; then
#           the secondary grids: p = 0.9 under both cache semantics, and confidence-ordered
#           unmasking at p = 1.0 (sampler tuning equal on both sides)
#   report  the selected settings (each model's best, B's NFE/vun frontier) again on REPORT_SAMPLES
#           fresh samples of seed REPORT_SEED, the tables, the plot and the verdict
#           -> $RUNS/report.md, $RUNS/report.png (report seed), $RUNS/report-selection.png
#   export  the four models the sweeps compare (EMA weights, Hugging Face folders of this framework's
#           layout, ~10 MB each) -> $MODELS/<label>: what the sweeps need, without the training runs
#   import  those folders back into checkpoints ($RUNS/imported/<label>), which the sweeps then use
#           where a run's own checkpoint is absent; the round trip is exact, so select and report
#           give the same numbers from them (not part of `all`)
#
# Environment: RUNS=runs/e1, JOBS=2, THREADS=1, BASE_STEPS=10000, MORE_STEPS=4000,
# SELECT_SAMPLES=256, REPORT_SAMPLES=1024, CORRECTOR_INPUT=masked, MODELS=experiments/e1-models, TRAIN_OVERRIDES (extra overrides
# for every run), PLAIN_STEPS, FAST_STEPS, CORRECTOR_STEPS, OMEGAS (comma lists), GRIDS (the
# selection grids, default "main p0.9-once p0.9-official confidence"), FCD=1 (0: no FCD column).
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=${1:-all}
PROSECO=${PROSECO:-.venv/bin/proseco}
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/e1}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${THREADS:-1}
BASE_STEPS=${BASE_STEPS:-10000}
MORE_STEPS=${MORE_STEPS:-4000}
SELECT_SEED=${SELECT_SEED:-1}
SELECT_SAMPLES=${SELECT_SAMPLES:-256}
REPORT_SEED=${REPORT_SEED:-2}
REPORT_SAMPLES=${REPORT_SAMPLES:-1024}
CORRECTOR_INPUT=${CORRECTOR_INPUT:-masked}
PLAIN_STEPS=${PLAIN_STEPS:-4,8,16,32,64,128,256}
FAST_STEPS=${FAST_STEPS:-4,8,16,32}
CORRECTOR_STEPS=${CORRECTOR_STEPS:-1,2,4,8}
OMEGAS=${OMEGAS:-1,2,4,8}
MODELS=${MODELS:-experiments/e1-models}
CONFIG=experiments/configs/qm9-e1-mdlm.yaml
# The FCD guard on the report seed (the fcd package of the eval extra; about 25 s per point).
# Never at the end of an xargs line: xargs -L joins a line that ends in a blank to the next one.
FCD_FLAG=$([[ ${FCD:-1} == 1 ]] && echo --fcd || true)
B_STEPS=$((BASE_STEPS + MORE_STEPS))
A_STEPS=$((BASE_STEPS + 2 * MORE_STEPS))

step_dir() { printf '%s/checkpoints/step_%08d' "$1" "$2"; }
gcd() { local a=$1 b=$2; while (( b )); do set -- "$b" $(( a % b )); a=$1; b=$2; done; echo "$a"; }
# Kept for good: every multiple of this, so base@BASE_STEPS and A@B_STEPS survive the rotation.
KEEP_EVERY=$(gcd "$BASE_STEPS" "$MORE_STEPS")

data() {
  [[ -f data/qm9/shards/manifest.json ]] && return
  $PROSECO tokenizer train --corpus qm9 --kind char --out data/qm9/tokenizer --overwrite
  $PROSECO tokenizer shard --corpus qm9 --tokenizer data/qm9/tokenizer --seq-len 32 --packing pad \
    --out data/qm9/shards --overwrite
}

train_run() {  # NAME STEPS START [OVERRIDES...]: START is a checkpoint to branch from, or "none"
  local name=$1 steps=$2 start=$3 resume=auto
  shift 3
  [[ -f $RUNS/$name/.done ]] && return
  mkdir -p "$RUNS"
  # A branch starts from the base's checkpoint once; after that it resumes its own.
  if [[ $start != none && ! -d $RUNS/$name/checkpoints ]]; then resume=$start; fi
  echo "train $name to step $steps (log $RUNS/$name.log)"
  # shellcheck disable=SC2086
  $PROSECO train $CONFIG logging.run_dir="$RUNS/$name" name="$name" train.max_steps="$steps" \
    checkpoint.resume="$resume" checkpoint.keep_every="$KEEP_EVERY" "$@" ${TRAIN_OVERRIDES:-} >> "$RUNS/$name.log" 2>&1
  touch "$RUNS/$name/.done"
}

train() {
  # The base runs alone, so it gets every job's threads; the branches then run side by side.
  OMP_NUM_THREADS=$((OMP_NUM_THREADS * JOBS)) train_run base "$BASE_STEPS" none
  local start
  start=$(step_dir "$RUNS/base" "$BASE_STEPS")
  train_run mdlm "$A_STEPS" "$start" &
  local a=$!
  if [[ $JOBS -lt 2 ]]; then wait $a; fi
  train_run proseco "$B_STEPS" "$start" diffusion.corrector_training=true \
    diffusion.corrector_input="$CORRECTOR_INPUT"
  wait $a
}

trained() {  # "label checkpoint" lines: every model the sweeps compare, in its training run
  echo "base@$BASE_STEPS $(step_dir "$RUNS/base" "$BASE_STEPS")"
  echo "A@$B_STEPS $(step_dir "$RUNS/mdlm" "$B_STEPS")"
  echo "A@$A_STEPS $(step_dir "$RUNS/mdlm" "$A_STEPS")"
  echo "B@$B_STEPS $(step_dir "$RUNS/proseco" "$B_STEPS")"
}

models() {  # the same, each from its run where it has one, else as imported from $MODELS
  local label checkpoint
  while read -r label checkpoint; do
    [[ -d $checkpoint ]] || checkpoint=$RUNS/imported/$label
    echo "$label $checkpoint"
  done < <(trained)
}

export_models() {
  local label checkpoint
  while read -r label checkpoint; do
    $PROSECO convert export "$checkpoint" "$MODELS/$label" --overwrite
    # The remote code is pretrain/models/dit/modeling_proseco.py itself; import does not need it,
    # and four copies of it in the repository would only drift.
    rm -f "$MODELS/$label/modeling_proseco.py"
  done < <(models)
}

import_models() {
  local label
  while read -r label _; do
    [[ -d $RUNS/imported/$label/checkpoints ]] && continue
    $PROSECO convert import "$MODELS/$label" "$RUNS/imported/$label"
  done < <(trained)
}

sweep() {  # OUT LABEL CHECKPOINT SEED SAMPLES STEPS S OMEGAS [SAMPLER FLAGS...]: one finished sweep is not redone
  local out=$1 label=$2 checkpoint=$3 seed=$4 samples=$5 steps=$6 s=$7 omegas=$8
  shift 8
  [[ -f $out/sweep.csv ]] && return
  mkdir -p "$(dirname "$out")"
  $PROSECO sweep --checkpoint "$checkpoint" --label "$label" --steps "$steps" --corrector-steps "$s" \
    --corrector-every "$omegas" --num-samples "$samples" --batch-size "$samples" --seed "$seed" "$@" \
    --out "$out" > "$out.log" 2>&1
}

merge() {  # OUT: one sweep.csv from every sweep under OUT/parts
  # shellcheck disable=SC2046
  $PROSECO sweep --merge $(find "$1/parts" -mindepth 1 -maxdepth 1 -type d | sort) --out "$1" > "$1.log" 2>&1
}

GRIDS=${GRIDS:-main p0.9-once p0.9-official confidence}

grid_flags() {  # GRID -> its sweep flags: main grid (p = 1) and the secondary ones (p = 0.9 under both
                # caches; confidence-ordered unmasking, the same for every model)
  case $1 in
    main) echo --nucleus-p 1.0 ;;
    p0.9-once) echo --nucleus-p 0.9 --nucleus-cache once ;;
    p0.9-official) echo --nucleus-p 0.9 --nucleus-cache official ;;
    confidence) echo --nucleus-p 1.0 --unmasking confidence ;;
    *) return 1 ;;
  esac
}

select_grids() {  # the selection sweeps, one line per sweep
  local grid flags label checkpoint
  for grid in $GRIDS; do
    flags=$(grid_flags "$grid")
    local out=$RUNS/select-$grid
    while read -r label checkpoint; do
      echo "$out/parts/$label-plain $label $checkpoint $SELECT_SEED $SELECT_SAMPLES $PLAIN_STEPS 0 1 $flags"
      if [[ $label == B@* ]]; then
        echo "$out/parts/$label-corrector $label $checkpoint $SELECT_SEED $SELECT_SAMPLES $FAST_STEPS $CORRECTOR_STEPS $OMEGAS $flags"
      fi
    done < <(models)
  done
}

export -f sweep
export PROSECO

case $STAGE in all|data|train|select|report|export|import) ;; *)
  echo "unknown stage $STAGE: one of all, data, train, select, report, export, import" >&2; exit 2 ;;
esac
# Before any stage runs: a misspelt grid would otherwise surface only at selection, after training.
for grid in $GRIDS; do
  grid_flags "$grid" >/dev/null || {
    echo "unknown grid $grid in GRIDS: one of main, p0.9-once, p0.9-official, confidence" >&2; exit 2; }
done
if [[ $STAGE == import ]]; then import_models; fi
if [[ $STAGE == all || $STAGE == data ]]; then data; fi
if [[ $STAGE == all || $STAGE == train ]]; then train; fi
if [[ $STAGE == all || $STAGE == select ]]; then
  select_grids | xargs -P "$JOBS" -L1 bash -c 'sweep "$@"' _
  for grid in $GRIDS; do merge "$RUNS/select-$grid"; done
fi
if [[ $STAGE == all || $STAGE == report ]]; then
  # The settings chosen on the selection seed, sampled again with a fresh seed: the reported numbers.
  $PYTHON -m experiments.finetune_report select --sweep "$RUNS/select-main/sweep.csv" \
    --out "$RUNS/selected.txt"
  while read -r label checkpoint steps s omega; do
    echo "$RUNS/report-main/parts/$label-T$steps-S$s-w$omega $label $checkpoint $REPORT_SEED $REPORT_SAMPLES $steps $s $omega $FCD_FLAG --nucleus-p 1.0"
  done < "$RUNS/selected.txt" | xargs -P "$JOBS" -L1 bash -c 'sweep "$@"' _
  merge "$RUNS/report-main"
  $PYTHON -m experiments.finetune_report verdict --sweep "$RUNS/report-main/sweep.csv" \
    --selection "$RUNS/select-main/sweep.csv" --secondary "$RUNS/select-p0.9-once/sweep.csv" \
    --secondary "$RUNS/select-p0.9-official/sweep.csv" \
    --secondary "$RUNS/select-confidence/sweep.csv" --baseline "A@$A_STEPS" --candidate "B@$B_STEPS" \
    --out "$RUNS/report.md"
fi
if [[ $STAGE == export ]]; then export_models; fi
