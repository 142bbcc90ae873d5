"""Failures end every process, with the defaults a user runs (DataLoader workers on, real launchers).

A rank that dies, a non-finite loss with train.on_nonfinite=stop, and token ids the model has no
embedding for must each end the whole job with a non-zero exit code, within the collective
timeout, under a per-task launch (as srun starts ranks) and under torchrun: no process may be
left joining DataLoader workers that ignore SIGTERM.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.dist.parallel_worker import TINY
from tests.helpers import ROOT, make_word_shards
from tokenizer.format import read_manifest, write_manifest, write_shard

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]
WORKER = ROOT / "tests" / "dist" / "parallel_worker.py"
WORKERS_ON = "data.num_workers=1"  # the default of a run config; TINY sets 0 for the parity tests
TIMEOUT_S = 20


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_word_shards(tmp_path_factory.mktemp("corpus"), seq_len=16)


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.shards={shards}", f"logging.run_dir={run_dir}", "train.eval_every=0",
            "checkpoint.every=0", "logging.log_every=1", "sampling.num_samples=2", "sampling.batch_size=2",
            "sampling.steps=2", "train.max_steps=6", f"parallel.timeout_s={TIMEOUT_S}", WORKERS_ON, *extra]


def wait_all(procs: list[subprocess.Popen], limit: float) -> list[float]:
    """Exit times (monotonic) of every process; fails the test (killing them) past `limit` s."""
    deadline = time.monotonic() + limit
    exits: dict[int, float] = {}
    while len(exits) < len(procs):
        for i, proc in enumerate(procs):
            if i not in exits and proc.poll() is not None:
                exits[i] = time.monotonic()
        if time.monotonic() > deadline:
            for proc in procs:  # the whole session: a hung DataLoader worker holds the pipes open
                os.killpg(proc.pid, signal.SIGKILL)
            outputs = [proc.communicate(timeout=30)[1][-3000:] for proc in procs]
            pytest.fail(f"processes {sorted(set(range(len(procs))) - set(exits))} still running after {limit} s: "
                        f"{outputs}")
        time.sleep(0.05)
    return [exits[i] for i in range(len(procs))]


def per_task_launch(args: list[str], world: int, port: int, extra_env: dict[str, str]) -> list[subprocess.Popen]:
    """`world` ranks started one by one with RANK/WORLD_SIZE set, as `srun` starts its tasks."""
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT), **extra_env}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "train", *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def torchrun_launch(args: list[str], world: int, extra_env: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra_env}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                             str(WORKER), "train", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def die(tmp_path: Path) -> dict[str, str]:
    """Rank 1 exits abruptly before step 2 and writes when (tests/dist/parallel_worker.py)."""
    return {"PROSECO_TEST_DIE": f"rank=1,step=2,stamp={tmp_path / 'died'}"}


def seconds_after_death(tmp_path: Path, exit_wall_time: float) -> float:
    return exit_wall_time - float((tmp_path / "died").read_text())


def test_a_dead_rank_ends_the_other_ranks_per_task_launch(shards, tmp_path):
    """Rank 0, whose DataLoader worker is running, fails with an error well within
    parallel.timeout_s instead of hanging (the target: under 15 s)."""
    procs = per_task_launch(overrides(shards, tmp_path / "run", "parallel.dp=2"), 2, 29531, die(tmp_path))
    wait_all(procs, limit=120)
    assert procs[1].returncode == 17 and procs[0].returncode not in (0, None), [p.returncode for p in procs]
    assert seconds_after_death(tmp_path, time.time()) < 15


def test_a_dead_rank_ends_the_job_under_torchrun(shards, tmp_path):
    """torchrun ends the job within 15 s of the death (it would SIGKILL a survivor that ignored
    its SIGTERM only after 30 s)."""
    proc = torchrun_launch(overrides(shards, tmp_path / "run", "parallel.dp=2"), 2, die(tmp_path))
    wait_all([proc], limit=120)
    assert proc.returncode != 0 and seconds_after_death(tmp_path, time.time()) < 15


def test_a_nonfinite_loss_stops_the_run_with_workers_on(shards, tmp_path):
    """train.on_nonfinite=stop raises; the process (and its DataLoader worker) exits, non-zero."""
    # A learning rate of 1e30 without clipping turns the weights non-finite after one update.
    args = overrides(shards, tmp_path / "run", "optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0",
                     "train.on_nonfinite=stop")
    procs = per_task_launch(args, 1, 29533, {})
    wait_all(procs, limit=90)
    _, err = procs[0].communicate()
    assert procs[0].returncode != 0 and "NonFiniteError" in err, err[-2000:]


def test_token_ids_outside_the_vocabulary_end_the_run_clearly(shards, tmp_path):
    """Shards whose ids exceed the tokenizer's vocabulary (a tokenizer swapped under a run) fail
    with the shard named and the fix, exit code 2 from `proseco train`, workers on."""
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(shards), str(broken)], check=True)
    manifest = read_manifest(broken)
    for shard in manifest.splits["train"].shards:
        rows = np.full((shard.samples, manifest.seq_len), manifest.vocab_size + 5, dtype=np.uint16)
        info = write_shard(broken / shard.path, rows, first_key=shard.first_key)
        shard.bytes, shard.sha256 = info.bytes, info.sha256
    manifest.fingerprint = manifest.compute_fingerprint()
    write_manifest(broken, manifest)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", "train",
                             *overrides(broken, tmp_path / "run", "data.max_corrupt_fraction=0.5")],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_all([proc], limit=90)
    _, err = proc.communicate()
    assert proc.returncode == 2 and "ids outside the vocabulary" in err and "Traceback" not in err, err[-2000:]


def test_damaged_samples_are_counted_in_the_metrics(shards, tmp_path):
    """A shard whose bytes no longer match its digest is tolerated under a generous
    max_corrupt_fraction: its samples train as invalid, and the metrics say how many."""
    from pretrain.config import load_config
    from pretrain.metrics import read_metrics
    from pretrain.train import train

    altered = tmp_path / "altered"
    subprocess.run(["cp", "-r", str(shards), str(altered)], check=True)
    first = altered / read_manifest(altered).splits["train"].shards[0].path
    data = bytearray(first.read_bytes())
    data[-700] ^= 0xFF  # inside the last sample
    first.write_bytes(bytes(data))
    run = tmp_path / "run"
    train(load_config(None, overrides(altered, run, "data.max_corrupt_fraction=0.5", "data.shuffle=false",
                                      "train.max_steps=8")))
    records = [r for r in read_metrics(run) if r["split"] == "train"]
    counts = [r["corrupt_samples"] for r in records]
    assert counts == sorted(counts) and counts[-1] == 40  # cumulative: all 40 samples of the first shard


def test_ctrl_c_saves_and_exits_like_a_preemption(shards, tmp_path):
    """Ctrl-C (SIGINT to the whole foreground group, DataLoader workers included) checkpoints the
    step and exits with 75; the same command resumes from there."""
    from pretrain.checkpoint import latest_checkpoint

    run_dir = tmp_path / "run"
    args = [*overrides(shards, run_dir, "train.max_steps=100000"), "logging.progress=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # A background process of a non-interactive shell starts with SIGINT ignored; a terminal's does not.
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", "train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    wait_all([proc], limit=60)
    out, err = proc.communicate()
    assert proc.returncode == 75 and "interrupt (Ctrl-C)" in out + err and "Traceback" not in err, err[-3000:]
    saved = latest_checkpoint(run_dir / "checkpoints")
    assert saved is not None
    resumed = subprocess.run([sys.executable, "-m", "pretrain", "train", *args[:-1], "train.max_steps=" +
                              str(int(saved.name.split("_")[1]) + 1)], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0 and f"resumed from {saved}" in resumed.stdout + resumed.stderr


def test_a_second_ctrl_c_aborts_at_once(monkeypatch):
    from pretrain.train import PreemptionFlag

    flag = PreemptionFlag()
    try:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # at once after the first: the same event (srun + torchrun)
        assert flag.agreed() and flag.describe() == "interrupt (Ctrl-C)"
        monkeypatch.setattr(PreemptionFlag, "SAME_EVENT_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the handler before training: Python's default
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
