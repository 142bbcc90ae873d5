"""Where a process stands: launcher variables, Slurm node lists, backends; how a rank exits."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.env import LaunchError, backend_for, detect_launch, first_slurm_host, pick_device

ROOT = Path(__file__).resolve().parents[1]


def test_single_process():
    launch = detect_launch({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")


def test_torchrun_and_deepspeed_variables():
    launch = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                            "MASTER_PORT": "1234"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 8, 1, "torchrun")
    assert (launch.master_addr, launch.master_port) == ("n1", 1234)


def test_bare_srun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    launch = detect_launch(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 8, 1, "slurm")
    assert launch.master_addr == "gpu07" and launch.master_port == 29500 + 4242


def test_srun_torchrun_prefers_the_launcher_rank():
    """Under `srun torchrun`, every worker sees SLURM_PROCID=0 but its own RANK."""
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert detect_launch(env).rank == 3 and detect_launch(env).launcher == "torchrun"


def test_one_slurm_task_is_a_single_process():
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"


@pytest.mark.parametrize("nodelist, first", [("node[003-005,9],gpu1", "node003"), ("gpu1", "gpu1"),
                                             ("a-b[1,3]", "a-b1"), ("", "127.0.0.1"), ("x12,y13", "x12")])
def test_first_slurm_host(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: parse the list ourselves
    assert first_slurm_host(nodelist) == first


def test_backend_never_asks_for_what_the_build_lacks():
    assert backend_for(torch.device("cpu")) == "gloo"


@pytest.fixture
def gpus(monkeypatch):
    """A machine whose processes see `gpus.visible` CUDA devices; records torch.cuda.set_device."""
    class Gpus:
        visible = 0
        chosen: list[int] = []

    monkeypatch.setattr(torch.cuda, "is_available", lambda: Gpus.visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: Gpus.visible)
    monkeypatch.setattr(torch.cuda, "set_device", Gpus.chosen.append)
    return Gpus


@pytest.mark.parametrize("visible, local_rank, index", [
    (8, 3, 3),  # torchrun, `srun --gpus-per-node=8`: every process sees the node's GPUs
    (1, 5, 0),  # `srun --gpus-per-task=1`: SLURM_LOCALID 5, but the task sees one device, index 0
    (1, 0, 0),
    (2, 3, 1),  # `srun --gpus-per-task=2`: never an index past the visible ones
])
def test_the_gpu_is_one_this_process_sees(gpus, visible, local_rank, index):
    gpus.visible = visible
    assert pick_device("auto", local_rank) == torch.device("cuda", index)
    assert pick_device("cuda", local_rank) == torch.device("cuda", index)
    assert gpus.chosen == [index, index]


def test_cpu_unless_cuda_is_there_or_asked_for(gpus):
    assert pick_device("auto", 3) == torch.device("cpu")
    with pytest.raises(LaunchError, match="CUDA is not available"):
        pick_device("cuda", 0)
    gpus.visible = 2
    assert pick_device("cpu", 1) == torch.device("cpu") and gpus.chosen == []


def test_end_process_exits_with_its_code_after_atexit_and_flush(tmp_path):
    """What a rank of a multi-process run leaves through (pretrain/cli.py): the code, the
    buffered output and the atexit handlers (wandb's, logging's, multiprocessing's) all survive
    skipping the interpreter's finalization."""
    marker = tmp_path / "atexit-ran"
    script = ("import atexit, sys\n"
              "from parallel.env import end_process\n"
              f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
              "sys.stdout.write('no newline, still buffered')\n"
              "sys.stderr.write('and on stderr')\n"
              "end_process(75)\n"
              "raise SystemExit('not reached')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 75, done.stderr
    assert (done.stdout, done.stderr) == ("no newline, still buffered", "and on stderr")
    assert marker.read_text() == "ran"
