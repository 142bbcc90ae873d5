"""Time from a rank's death to the exit of every other rank, with DataLoader workers on.

Two data-parallel ranks train a tiny model on the default shards; rank 1 exits abruptly
(`os._exit`) before step 2 and writes the time of its death. Measured: the seconds until the
survivor has exited (per-task launch, as `srun` starts ranks) or until torchrun has (it ends the
job when a worker fails), at the default collective timeout (`parallel.timeout_s`, 600 s) and at
20 s. Rounds alternate the two launchers; the figure is the median, with the spread.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "parallel_worker.py"
SHARDS = ROOT / "data" / "shakespeare" / "shards"
ROUNDS = 3
LIMIT_S = 900.0  # a hang ends the benchmark with this figure, not forever
OVERRIDES = [f"data.shards={SHARDS}", "data.num_workers=1", "train.eval_every=0", "checkpoint.every=0",
             "train.max_steps=6", "parallel.dp=2"]


def _env(stamp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "PROSECO_TEST_DIE": f"rank=1,step=2,stamp={stamp}", **extra}


def _wait(procs: list[subprocess.Popen]) -> float:
    """When the last of `procs` exited (killing them past LIMIT_S)."""
    deadline = time.monotonic() + LIMIT_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return time.time()


def _per_task(run_dir: Path, timeout_s: float, port: int) -> float:
    stamp = run_dir / "died"
    args = [sys.executable, str(WORKER), "train", *OVERRIDES, f"logging.run_dir={run_dir}",
            f"parallel.timeout_s={timeout_s}"]
    procs = [subprocess.Popen(args, env=_env(stamp, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in range(2)]
    end = _wait(procs)
    return end - float(stamp.read_text())


def _torchrun(run_dir: Path, timeout_s: float) -> float:
    stamp = run_dir / "died"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
            "train", *OVERRIDES, f"logging.run_dir={run_dir}", f"parallel.timeout_s={timeout_s}"]
    end = _wait([subprocess.Popen(args, env=_env(stamp), cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)])
    return end - float(stamp.read_text())


def run() -> list[dict]:
    if not (SHARDS / "manifest.json").is_file():
        raise SystemExit(f"{SHARDS} is missing: run `make data` first")
    seconds: dict[tuple[str, float], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(ROUNDS):
            for timeout_s in (600.0, 20.0):
                for launcher in ("per_task", "torchrun"):
                    run_dir = Path(tmp) / f"{launcher}_{timeout_s:g}_{round_index}"
                    run_dir.mkdir()
                    took = (_per_task(run_dir, timeout_s, 29600 + round_index) if launcher == "per_task"
                            else _torchrun(run_dir, timeout_s))
                    seconds.setdefault((launcher, timeout_s), []).append(took)
    rows = []
    for (launcher, timeout_s), values in sorted(seconds.items()):
        spread = f"min {min(values):.1f}, max {max(values):.1f} s over {len(values)} rounds"
        rows.append({"name": f"death_to_exit_s_{launcher}_timeout{timeout_s:g}",
                     "value": round(statistics.median(values), 2), "unit": "s",
                     "what": f"seconds from rank 1's death to the exit of every other process ({launcher}, "
                             f"parallel.timeout_s={timeout_s:g}, DataLoader workers on); target within the "
                             f"timeout and < 15 s at the default; {spread}"})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
