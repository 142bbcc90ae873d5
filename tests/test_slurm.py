"""`proseco train` under a real Slurm (slurm/local-cluster.sh): srun with two tasks, and a signal
that checkpoints, requeues and resumes the job.

Runs where Slurm is installed and running, or can be started (root with Debian's packages, as on
CI); skipped elsewhere.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.metrics import read_metrics
from tests.helpers import ROOT, make_word_shards

pytestmark = pytest.mark.slurm


def _cluster_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    if not _cluster_up():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("no Slurm here and no way to start one (needs root and apt-get)")
        started = subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "start"], capture_output=True,
                                 text=True, timeout=600)
        if started.returncode != 0:
            pytest.skip(f"could not start a local Slurm: {started.stderr[-500:]}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_word_shards(tmp_path_factory.mktemp("corpus"), seq_len=16)


def overrides(shards: Path, run_dir: Path, steps: int) -> list[str]:
    return [f"data.shards={shards}", f"logging.run_dir={run_dir}", "model.d_model=32", "model.n_layers=2",
            "model.n_heads=2", "model.cond_dim=16", "data.global_batch_size=8", "data.micro_batch_size=4",
            "data.num_workers=0", "train.eval_every=0", "train.eval_batches=1", "checkpoint.every=0",
            "logging.log_every=1", "logging.progress=false", "sampling.num_samples=2", "sampling.batch_size=2",
            "sampling.steps=2", f"train.max_steps={steps}", "parallel.timeout_s=120"]


def submit(run_dir: Path, args: list[str]) -> str:
    env = {**os.environ, "PROSECO": f"{sys.executable} -m pretrain.cli", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--mem-per-cpu=3000",
                          f"--output={run_dir}/slurm-%j.out", str(ROOT / "slurm" / "train.sbatch"), *args],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout
    return out.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def wait_for(job_id: str, timeout: float = 900) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job(job_id)}")


def test_srun_two_tasks_train_data_parallel(cluster, shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    info = wait_for(submit(run_dir, overrides(shards, run_dir, steps=4)))
    output = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output[-3000:]
    assert "dp=2" in output  # ranks came from SLURM_PROCID / SLURM_NTASKS
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == [1, 2, 3, 4]


def test_signal_checkpoints_requeues_and_resumes(cluster, shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job_id = submit(run_dir, overrides(shards, run_dir, steps=40))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # as --signal=USR1@300 would
    info = wait_for(job_id)
    output = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, output[-3000:]
    assert "requeueing" in output and "resumed from" in output
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps[-1] == 40 and sorted(set(steps)) == list(range(1, 41))
    json.loads((run_dir / "checkpoints" / "step_00000040" / "meta.json").read_text())
