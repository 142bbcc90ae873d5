"""The order a model family's plan is applied in, the same for every family (torchtitan's):
tensor parallelism, activation checkpointing, compile, then data parallelism."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.compile import apply_compile
from parallel.config import ParallelConfig
from parallel.data_parallel import apply_activation_checkpointing, apply_fsdp
from parallel.mesh import Layout


def apply_parallelisms(model: nn.Module, blocks: Iterable[nn.Module], layout: Layout, mesh: DeviceMesh | None,
                       cfg: ParallelConfig, tensor_parallel: Callable[[DeviceMesh, bool], None]) -> None:
    """Parallelise `model` in place. `tensor_parallel(tp_mesh, sequence_parallel)` is the family's
    own plan; `blocks` are the modules checkpointed, compiled and sharded one by one."""
    blocks = list(blocks)
    if layout.tp > 1:
        tensor_parallel(mesh["tp"], cfg.sequence_parallel)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if cfg.compile:
        apply_compile(blocks)
    if layout.dp > 1:
        apply_fsdp(model, blocks, mesh, cfg)
        # FSDP2 warns (once per rank) that the model returns a view: nn.Linear on [B, L, d] gives
        # a view of its 2-D product. It matters only to an in-place op on the output, and the step
        # never makes one; a copy to quiet it would cost B x L x V floats every forward.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
