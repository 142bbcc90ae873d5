"""Where this process stands in the job: rank, world size, device, process group.

The same `proseco train` runs as one process, under torchrun or the DeepSpeed launcher (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set by the launcher) and under a bare `srun` (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID; the master is the first node of the allocation). Launcher variables
win: under `srun torchrun` every worker sees SLURM_PROCID=0 but its own RANK.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


class LaunchError(RuntimeError):
    """The environment cannot run what was asked (e.g. CUDA on a machine without it)."""


@dataclass(frozen=True)
class Launch:
    """What the environment says about this process, before any process group exists."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "single", "torchrun" (also DeepSpeed's launcher) or "slurm"
    master_addr: str | None = None
    master_port: int | None = None


def detect_launch(environ: dict[str, str] | None = None) -> Launch:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun",
                      env.get("MASTER_ADDR"), int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None)
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        port = int(env.get("MASTER_PORT", DEFAULT_PORT + job % 10000))
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodes)
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      "slurm", addr, port)
    return Launch(0, 1, 0, "single")


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list ("node[003-005,9],gpu1" -> "node003"); scontrol when present."""
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if head is None:
        return nodelist.split(",")[0]
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """"auto" (CUDA when available), "cuda" or "cpu"; a CUDA device is this process's local GPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LaunchError("device cuda was asked for but CUDA is not available; use device auto or cpu")
        index = local_gpu_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def local_gpu_index(local_rank: int, visible: int) -> int:
    """This process's GPU among the `visible` ones. Where every process sees all of its node's GPUs
    (torchrun, `srun --gpus-per-node`), the local rank. Where each sees only its own
    (`srun --gpus-per-task=1`, or CUDA_VISIBLE_DEVICES narrowed per process), the one it sees:
    index 0, while SLURM_LOCALID runs 1..7. Never an index past the visible ones: the local rank
    modulo their count (`--gpus-per-task=2`: each task's two GPUs are its own)."""
    return 0 if visible <= 1 else local_rank % visible


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA when this build has it, gloo otherwise (never a backend the build lacks)."""
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_distributed(launch: Launch, device_preference: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Start the process group when there is more than one process (no-op otherwise).

    The timeout bounds every collective: when a rank dies, the others fail with an error after
    `timeout_s` instead of hanging (gloo raises; NCCL aborts through its watchdog).
    """
    device = pick_device(device_preference, launch.local_rank)
    if launch.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(launch.master_port or DEFAULT_PORT))
        if device.type == "cuda":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend=backend_for(device), rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(launch.rank, launch.world_size, launch.local_rank, device, launch.launcher)


_tore_down_a_shared_group = False  # see ended_a_process_group


def shutdown() -> None:
    global _tore_down_a_shared_group
    if dist.is_initialized():
        _tore_down_a_shared_group |= dist.get_world_size() > 1
        dist.destroy_process_group()


def ended_a_process_group() -> bool:
    """Whether this process has torn down a process group of more than one rank (`shutdown`):
    then it should leave through `end_process`."""
    return _tore_down_a_shared_group


def end_process(code: int) -> NoReturn:
    """Exit with `code` as `sys.exit` would (atexit handlers run, stdout and stderr flushed), but
    without the interpreter's finalization.

    Why: a rank that has torn its Gloo process group down can still abort in finalization, with
    "terminate called without an active exception" (SIGABRT), when the last objects holding the
    group's C++ threads (DeepSpeed keeps its own handles on the groups) are freed in whatever
    order the interpreter frees modules at exit. Seen under the DeepSpeed launcher after a
    stop-file checkpoint: the launcher then reports the abort instead of 75, and the job is not
    requeued. Nothing is lost by skipping it: checkpoints and metrics are closed and synced by
    then, and multiprocessing's own atexit handler ends the DataLoader workers.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
