"""Data parallelism (FSDP2, sharded or replicated) and activation checkpointing, applied from
outside to any model.

A model family's plan calls these after its tensor-parallel plan (torchtitan's order: tp ->
activation checkpointing -> FSDP2), naming the modules to wrap (its transformer blocks).
`parallel.data_parallel` picks the FSDP2 mesh: `fsdp` shards parameters, gradients and optimizer
state over all data-parallel ranks (ZeRO-3; `fsdp_no_reshard` keeps parameters gathered between
forward and backward, ZeRO-2-like); `ddp` replicates them and all-reduces gradients (FSDP2 on a
shard group of one). Either way FSDP2 computes the mean of the gradients over data-parallel ranks;
the trainer multiplies the loss by dp so that gradients are sums divided by the global token count.

FSDP2 reduces a unit's gradients in the post-backward hook of each forward call. When the model
runs more than once before one backward (the reuse step's corrector forward inside the loss), the
later calls' graphs are backpropagated first, and each would reduce what has been accumulated so
far: gradients would travel once per forward call. `apply_fsdp` therefore lets only the graph of
the earliest forward in a backward reduce (`_JoinedBackward`): one reduction per step, whatever
the number of forward calls.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.autograd.graph import Node, register_multi_grad_hook
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils._pytree import tree_leaves
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
    _JOINED[model] = _JoinedBackward(model)


def reshard_parameters(model: nn.Module) -> None:
    """Put every FSDP2 unit of `model` back in its sharded state: its parameters are the DTensor
    shards again. Units that keep parameters gathered after forward (ddp, fsdp_no_reshard) hold
    plain full tensors after a no-grad forward (validation, sampling) until the next backward;
    code that treats the parameters as the sharded state (the EMA swap) calls this first."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the data-parallel gradient reduction on all but the last micro-batch of a step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        if model in _JOINED:
            _JOINED[model].set_sync(enabled)


class _Forward:
    """One forward call with grad: its output's autograd nodes until its backward begins, and
    the call before it (until then too, so that no chain of steps stays alive)."""

    def __init__(self, nodes: list[Node], earlier: _Forward | None):
        self.nodes = nodes
        self.earlier = earlier
        self.begun = False

    def pending_in_this_backward(self) -> bool:
        """Its graph is part of the backward in progress and has not been entered yet."""
        return not self.begun and any(torch._C._will_engine_execute_node(node) for node in self.nodes)


class _JoinedBackward:
    """Reduce a root FSDP module's gradients once per backward, however many forward calls it joins.

    Autograd runs the graphs of several forwards joined in one backward in reverse order of the
    calls (a node created later runs first), and a parameter's gradient is accumulated only once
    every graph has delivered its part. So the graph that runs last, the earliest call's, is the
    one whose post-backward hooks see the whole gradient: when a graph begins and an earlier
    call's graph is still to come in this backward, reduction is switched off; when the earliest
    begins, it is switched back to what `set_gradient_sync` asked for. One forward per backward
    (two_pass, pipeline stages, which set gradient sync themselves) is never touched. Had autograd
    ever run the earliest graph first, the later ones would reduce as FSDP2 does by default: more
    traffic, the same gradients.
    """

    def __init__(self, model: FSDPModule):
        self.sync = True  # what set_gradient_sync asked for
        self.deferred = False  # reduction switched off for the backward in progress
        self.latest: _Forward | None = None
        model.register_forward_hook(self._after_forward)

    def set_sync(self, enabled: bool) -> None:
        self.sync, self.deferred = enabled, False

    def _after_forward(self, module: nn.Module, args, output) -> None:
        if not torch.is_grad_enabled():
            return
        tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        if not tensors:
            return
        call = _Forward([t.grad_fn for t in tensors], self.latest)
        self.latest = call
        register_multi_grad_hook(tensors, lambda _grad: self._backward_begins(module, call), mode="any")

    def _backward_begins(self, model: FSDPModule, call: _Forward) -> None:
        earlier, call.earlier, call.nodes, call.begun = call.earlier, None, [], True
        if self.latest is call:
            self.latest = None
        if earlier is not None and earlier.pending_in_this_backward():
            if not self.deferred:
                self.deferred = True
                model.set_requires_gradient_sync(False)
        elif self.deferred:
            self.deferred = False
            model.set_requires_gradient_sync(self.sync)


_JOINED: "weakref.WeakKeyDictionary[nn.Module, _JoinedBackward]" = weakref.WeakKeyDictionary()
