"""`proseco train` under a real Slurm (slurm/local-cluster.sh): srun with two tasks, a signal that
checkpoints, requeues and resumes the job (srun per task and srun + torchrun), and the CPUs a
task gets from --cpus-per-task.

Runs where Slurm can be started (root with Debian's packages, as on CI: slurm/local-cluster.sh,
which restarts a cluster of its own whose configuration is stale) or is running; skipped elsewhere.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from pretrain.metrics import read_metrics
from tests.helpers import ROOT, TORCH_EXTENSIONS, make_word_shards

pytestmark = pytest.mark.slurm


def _cluster_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() == 0 and shutil.which("apt-get") is not None:
        # Also when one is up: `start` brings a local cluster with an older configuration up to date.
        started = subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "start"], capture_output=True,
                                 text=True, timeout=600)
        if started.returncode != 0 and not _cluster_up():
            pytest.skip(f"could not start a local Slurm: {started.stderr[-500:]}")
    elif not _cluster_up():
        pytest.skip("no Slurm here and no way to start one (needs root and apt-get)")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_word_shards(tmp_path_factory.mktemp("corpus"), seq_len=16)


def overrides(shards: Path, run_dir: Path, steps: int) -> list[str]:
    return [f"data.shards={shards}", f"logging.run_dir={run_dir}", "model.d_model=32", "model.n_layers=2",
            "model.n_heads=2", "model.cond_dim=16", "data.global_batch_size=8", "data.micro_batch_size=4",
            "data.num_workers=0", "train.eval_every=0", "train.eval_batches=1", "checkpoint.every=0",
            "logging.log_every=1", "logging.progress=false", "sampling.num_samples=2", "sampling.batch_size=2",
            "sampling.steps=2", f"train.max_steps={steps}", "parallel.timeout_s=120"]


# Two processes either way: two srun tasks, or one srun task (a node) running torchrun with two workers.
LAYOUTS = {"train.sbatch": ["--ntasks=2", "--cpus-per-task=1"],
           "train-torchrun.sbatch": ["--nodes=1", "--cpus-per-task=2"],
           "train-deepspeed.sbatch": ["--ntasks=2", "--cpus-per-task=1"]}
# What each script needs to train: the DeepSpeed one runs the DeepSpeed engine (ZeRO-2).
ENGINE = {"train-deepspeed.sbatch": ["parallel.engine=deepspeed",
                                     f"parallel.deepspeed_config={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"]}
# How `scancel` reaches the processes that act on a signal: srun's tasks, or (DeepSpeed's launcher
# runs outside job steps) the batch shell, which asks the run to stop through its stop file.
SIGNAL = {"train-deepspeed.sbatch": ["--batch"]}


def submit(run_dir: Path, args: list[str], script: str = "train.sbatch") -> str:
    env = {**os.environ, "PROSECO": f"{sys.executable} -m pretrain.cli", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
           "WORKERS_PER_NODE": "2", "DEEPSPEED": f"{sys.executable} -m deepspeed.launcher.runner",
           "PROSECO_JOB_STATE": str(run_dir / "job"), "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS}
    out = subprocess.run(["sbatch", "--parsable", *LAYOUTS[script], "--mem-per-cpu=3000",
                          f"--output={run_dir}/slurm-%j.out", str(ROOT / "slurm" / script), *args],
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
    # Ranks came from SLURM_PROCID / SLURM_NTASKS; rank 0's lines carry its task id (srun --label).
    assert re.search(r"^0: model: .* dp=2 ", output, re.M), output[-3000:]
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == [1, 2, 3, 4]


@pytest.mark.parametrize("script", ["train.sbatch", "train-torchrun.sbatch", "train-deepspeed.sbatch"])
def test_signal_checkpoints_requeues_and_resumes(cluster, shards, tmp_path, script):
    """Under torchrun too: torchrun exits 1 whatever its workers' codes; the workers' markers
    tell the script that they checkpointed (75). Under the DeepSpeed launcher (hostfile of the
    allocation, ZeRO-2 engine, 2 tasks): the batch shell's stop file."""
    if script == "train-deepspeed.sbatch" and find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (extra: deepspeed)")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job_id = submit(run_dir, [*overrides(shards, run_dir, steps=40), *ENGINE.get(script, [])], script)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    # As --signal=USR1@300 (B:USR1@300 for the DeepSpeed script) would.
    subprocess.run(["scancel", "--signal=USR1", *SIGNAL.get(script, []), job_id], check=True)
    info = wait_for(job_id)
    output = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, output[-3000:]
    # Slurm task id, and torchrun's rank (the DeepSpeed launcher runs outside srun: no label)
    label = {"train-torchrun.sbatch": "0: [rank0]:", "train-deepspeed.sbatch": ""}.get(script, "0: ")
    assert "requeueing" in output and f"\n{label}resumed from" in output, output[-3000:]
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps[-1] == 40 and sorted(set(steps)) == list(range(1, 41))
    json.loads((run_dir / "checkpoints" / "step_00000040" / "meta.json").read_text())


def test_torchrun_failure_is_not_requeued(cluster, shards, tmp_path):
    """Workers that fail (here: a config that does not validate) end the job without a requeue."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    info = wait_for(submit(run_dir, [*overrides(shards, run_dir, steps=4), "model.n_heads=3"],
                           "train-torchrun.sbatch"))
    output = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    assert info["JobState"] == "FAILED" and int(info["Restarts"]) == 0, output[-3000:]
    assert "requeueing" not in output and "n_heads" in output


def cpus_seen(tmp_path: Path, name: str, command: list[str], **env: str) -> list[tuple[str, str]]:
    """The number of CPUs each task's process may run on (its affinity), from a job of one task
    with --cpus-per-task=2, with the task's label."""
    out_dir = tmp_path / name
    out_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    job_id = subprocess.run(["sbatch", "--parsable", "--ntasks=1", "--cpus-per-task=2", "--mem-per-cpu=500",
                             f"--output={out_dir}/slurm-%j.out", *command], capture_output=True, text=True,
                            env=env, cwd=ROOT, check=True).stdout.strip().split(";")[0]
    info = wait_for(job_id, timeout=120)
    output = "".join(p.read_text() for p in out_dir.glob("slurm-*.out"))
    assert info["JobState"] == "COMPLETED", output[-3000:]
    return re.findall(r"^(.*)cpus (\d+)$", output, re.M)


@pytest.mark.parametrize("script", ["train.sbatch", "train-torchrun.sbatch"])
def test_tasks_get_the_cpus_of_cpus_per_task(cluster, tmp_path, script):
    """Since Slurm 22.05 srun no longer passes the job's --cpus-per-task on: where tasks are bound
    to CPUs (the local cluster binds to cores), a plain `srun` task of a --cpus-per-task=2 job gets
    one CPU. The scripts' tasks (the training process; torchrun) get both."""
    probe = tmp_path / "probe.sh"
    affinity = "import os; print('cpus', len(os.sched_getaffinity(0)))"
    probe.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{affinity}"\n')
    probe.chmod(0o755)
    plain = cpus_seen(tmp_path, "plain", ["--wrap", f"srun {probe}"])
    if plain != [("", "1")]:
        pytest.skip(f"a plain srun task gets {plain} CPUs here: this Slurm does not show the problem")
    variable = "PROSECO" if script == "train.sbatch" else "TORCHRUN"  # the command each script's srun starts
    assert cpus_seen(tmp_path, "script", [str(ROOT / "slurm" / script), "unused.yaml"], **{variable: str(probe)}) \
        == [("0: ", "2")]
