"""Data parallelism (FSDP2, sharded or replicated) and activation checkpointing, applied from
outside to any model.

A model family's plan calls these after its tensor-parallel plan (torchtitan's order: tp ->
activation checkpointing -> FSDP2), naming the modules to wrap (its transformer blocks).
`parallel.data_parallel` picks the FSDP2 mesh: `fsdp` shards parameters, gradients and optimizer
state over all data-parallel ranks (ZeRO-3; `fsdp_no_reshard` keeps parameters gathered between
forward and backward, ZeRO-2-like); `ddp` replicates them and all-reduces gradients (FSDP2 on a
shard group of one). Either way FSDP2 computes the mean of the gradients over data-parallel ranks;
the trainer multiplies the loss by dp so that gradients are sums divided by the global token count.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from parallel.config import ParallelConfig
from parallel.mesh import DP_DIMS


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in backward. The block's forward is wrapped in place,
    so parameter names (and checkpoints) do not change."""
    for block in blocks:
        inner = block.forward

        def forward(self, *args, _inner=inner):
            return checkpoint(_inner, *args, use_reentrant=False)

        block.forward = types.MethodType(forward, block)


def apply_fsdp(model: nn.Module, blocks: Iterable[nn.Module], mesh: DeviceMesh, cfg: ParallelConfig) -> None:
    """FSDP2 over the data-parallel mesh dimensions: each block is its own unit (gathered just in
    time), the rest of the model (embedding, head) one more."""
    dtype = torch.bfloat16 if cfg.param_dtype == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    reshard = cfg.data_parallel == "fsdp"
    dp_mesh = mesh[DP_DIMS]
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the data-parallel gradient reduction on all but the last micro-batch of a step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
