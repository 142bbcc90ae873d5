"""The DeepSpeed engine against the native one: step time, start-up under Slurm, checkpoint on a signal.

- Step time of DeepSpeed ZeRO-2 over native FSDP2 at dp=2 (benchmarks/zero_worker.py under
  torchrun: a 4 x 256 DiT, L=128, global batch 16 in micro-batches of 4, reuse step, fp32, gloo),
  paired rounds that alternate which engine goes first; median and interquartile range of the
  per-round ratio.
- Seconds from `sbatch` to the first training step on the local Slurm (slurm/local-cluster.sh):
  slurm/train-deepspeed.sbatch (DeepSpeed launcher, ZeRO-2, 2 workers) against slurm/train.sbatch
  (srun, 2 tasks, native), a tiny model, interleaved rounds. Skipped where no Slurm runs.
- Checkpoint-on-signal latency: two ranks under torchrun train until the run's stop file appears
  (what train-deepspeed.sbatch creates on Slurm's signal); seconds from its creation to the
  checkpoint in place and to the exit of the launch, DeepSpeed ZeRO-2 against native FSDP2.

    python -m benchmarks.run zero
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.stats import quartiles
from tests.helpers import ROOT, TORCH_EXTENSIONS, launch_env, make_word_shards, torchrun

ROUNDS = 3
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.cond_dim=32", "data.global_batch_size=8",
        "data.micro_batch_size=4", "data.num_workers=0", "train.eval_every=0", "train.eval_batches=1",
        "logging.log_every=1", "logging.progress=false", "sampling.num_samples=2", "sampling.batch_size=2",
        "sampling.steps=2", "optim.warmup_steps=0", "parallel.timeout_s=120"]
ZERO2 = ["parallel.engine=deepspeed", f"parallel.deepspeed_config={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"]


def _median_iqr(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = quartiles(values)
    return median, q1, q3


def _first_train_record(metrics: Path, deadline: float) -> float | None:
    """When a train record first appears in `metrics` (polled), or None past `deadline`."""
    while time.monotonic() < deadline:
        if metrics.is_file() and '"split": "train"' in metrics.read_text():
            return time.monotonic()
        time.sleep(0.1)
    return None


def step_time(root: Path) -> list[dict]:
    shards = make_word_shards(root / "corpus", seq_len=128, documents=400)
    out = root / "zero.json"
    torchrun(2, "benchmarks/zero_worker.py", str(shards), str(out), timeout=1800)
    rounds = json.loads(out.read_text())
    setup = (f"dp=2 under torchrun, 4 x 256 DiT, L=128, global batch 16 in micro-batches of 4, reuse step, fp32, "
             f"gloo on CPU; {len(rounds)} rounds of 3 steps per engine, the order reversed every other round")
    rows = []
    for native, label in (("fsdp", "FSDP2 fully sharded (parallel.data_parallel=fsdp, the default)"),
                          ("fsdp_no_reshard", "FSDP2 keeping parameters from forward to backward "
                                              "(parallel.data_parallel=fsdp_no_reshard, ZeRO-2-like)")):
        ratio, q1, q3 = _median_iqr([r["zero2"] / r[native] for r in rounds])
        rows.append({"name": f"zero2_over_{native}_step_time", "value": round(ratio, 3), "unit": "ratio",
                     "what": f"DeepSpeed ZeRO-2 step time / native {label} step time, per-round ratio, median "
                             f"(IQR {q1:.3f}-{q3:.3f}); {setup}"})
    for engine in rounds[0]:
        rows.append({"name": f"{engine}_step_s", "value": round(statistics.median(r[engine] for r in rounds), 3),
                     "unit": "s", "what": f"{engine}: seconds per optimizer step, median; {setup}"})
    return rows


def _slurm_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


def sbatch_to_first_step(root: Path) -> list[dict]:
    if not _slurm_up():
        print("  no Slurm here (slurm/local-cluster.sh start): sbatch-to-first-step skipped", flush=True)
        return []
    shards = make_word_shards(root / "slurm-corpus", seq_len=16)
    scripts = {"train-deepspeed.sbatch": ["--ntasks=2", "--cpus-per-task=1"],
               "train.sbatch": ["--ntasks=2", "--cpus-per-task=1"]}
    seconds: dict[str, list[float]] = {name: [] for name in scripts}
    for index in range(ROUNDS):
        for script in (list(scripts) if index % 2 == 0 else list(reversed(scripts))):
            run_dir = root / f"slurm-{script}-{index}"
            run_dir.mkdir()
            env = {**launch_env(), "PROSECO": f"{sys.executable} -m pretrain.cli",
                   "DEEPSPEED": f"{sys.executable} -m deepspeed.launcher.runner", "WORKERS_PER_NODE": "2",
                   "PROSECO_JOB_STATE": str(run_dir / "job"), "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS}
            engine = ZERO2 if script == "train-deepspeed.sbatch" else []
            start = time.monotonic()
            job = subprocess.run(["sbatch", "--parsable", *scripts[script], "--mem-per-cpu=3000",
                                  f"--output={run_dir}/slurm-%j.out", str(ROOT / "slurm" / script),
                                  *TINY, f"data.shards={shards}", f"logging.run_dir={run_dir}", "train.max_steps=400",
                                  "checkpoint.every=0", *engine],
                                 capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout.split(";")[0]
            first = _first_train_record(run_dir / "metrics.jsonl", start + 300)
            subprocess.run(["scancel", job.strip()], capture_output=True)
            _wait_gone(job.strip())
            if first is None:
                raise RuntimeError(f"{script}: no training step within 300 s (see {run_dir})")
            seconds[script].append(first - start)
    rows = []
    for script, values in seconds.items():
        median, q1, q3 = _median_iqr(values)
        what = ("DeepSpeed launcher from a hostfile of the allocation, ZeRO-2 engine" if "deepspeed" in script
                else "srun, one task per rank, native engine")
        rows.append({"name": f"sbatch_to_first_step_s_{script.split('.')[0].replace('-', '_')}",
                     "value": round(median, 2), "unit": "s",
                     "what": f"seconds from `sbatch slurm/{script}` to the first training step in metrics.jsonl on "
                             f"the local Slurm, 2 workers ({what}; tiny model), median (IQR {q1:.2f}-{q3:.2f}) over "
                             f"{len(values)} interleaved rounds"})
    return rows


def _wait_gone(job: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if not state:
            return
        time.sleep(0.5)


def checkpoint_on_signal(root: Path) -> list[dict]:
    shards = make_word_shards(root / "signal-corpus", seq_len=16)
    engines = {"zero2": ZERO2, "fsdp": []}
    found: dict[str, dict[str, list[float]]] = {name: {"saved": [], "exited": []} for name in engines}
    for index in range(ROUNDS):
        for name in (list(engines) if index % 2 == 0 else list(reversed(engines))):
            run_dir, stop = root / f"signal-{name}-{index}", root / f"stop-{name}-{index}"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "-m", "pretrain.cli", "train", *TINY, f"data.shards={shards}", f"logging.run_dir={run_dir}",
                       "train.max_steps=100000", "checkpoint.every=0", f"train.stop_file={stop}", *engines[name]]
            log = run_dir.with_suffix(".log")
            with open(log, "w") as stream:
                launch = subprocess.Popen(command, env=launch_env(), cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
            try:
                if _first_train_record(run_dir / "metrics.jsonl", time.monotonic() + 300) is None:
                    raise RuntimeError(f"{name}: no training step within 300 s")
                time.sleep(1.0)  # a few steps in
                asked = time.time()
                stop.touch()
                launch.wait(timeout=300)
                exited = time.time()
            finally:
                if launch.poll() is None:
                    launch.kill()
            # The manifest is the last file a save writes before the folder is renamed into place.
            saved = [p.stat().st_mtime for p in (run_dir / "checkpoints").glob("step_*/manifest.json")]
            # torchrun exits 1 whatever its workers' codes (see slurm/train-torchrun.sbatch): the log says.
            if "saving step" not in log.read_text() or not saved:
                raise RuntimeError(f"{name}: exit {launch.returncode}, checkpoints {saved}; see {log}")
            found[name]["saved"].append(max(saved) - asked)
            found[name]["exited"].append(exited - asked)
    rows = []
    for name, values in found.items():
        label = "DeepSpeed ZeRO-2" if name == "zero2" else "native FSDP2"
        for what, key in (("the checkpoint written (its manifest, the last file of a save)", "saved"),
                          ("the exit of the launch", "exited")):
            median, q1, q3 = _median_iqr(values[key])
            rows.append({"name": f"signal_to_{key}_s_{name}", "value": round(median, 2), "unit": "s",
                         "what": f"seconds from the stop file's creation (as on a Slurm signal) to {what}, {label}, "
                                 f"dp=2 under torchrun, tiny model; median (IQR {q1:.2f}-{q3:.2f}) over "
                                 f"{len(values[key])} interleaved rounds"})
    return rows


def run() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="zero-bench-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS)
        return step_time(root) + sbatch_to_first_step(root) + checkpoint_on_signal(root)


if __name__ == "__main__":
    for row in run():
        print(row)
