"""Gradient arithmetic that must agree across layouts: deferred partial sums, the global norm
and clipping, over any mix of plain tensors and DTensors."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


@torch.no_grad()
def reduce_partial_gradients(model: nn.Module) -> None:
    """Sum gradients left as partial sums across ranks (the norm weights under sequence
    parallelism, whose inputs are sequence slices). DTensor defers that reduction; doing it once
    per step, after accumulation, makes every gradient final before clipping and the update."""
    for p in model.parameters():
        grad = p.grad
        if isinstance(grad, DTensor) and any(placement.is_partial() for placement in grad.placements):
            placements = [Replicate() if placement.is_partial() else placement for placement in grad.placements]
            p.grad = grad.redistribute(grad.device_mesh, placements)


def _shard_groups(grad: DTensor) -> tuple:
    """The process groups over which this gradient is split (its local squares must be summed)."""
    mesh = grad.device_mesh
    # Anything but Replicate splits the tensor (Shard, and FSDP2's _StridedShard under tensor
    # parallelism, which is not a Shard subclass); partial sums are reduced before this point.
    return tuple(mesh.get_group(i) for i, placement in enumerate(grad.placements) if not placement.is_replicate())


@torch.no_grad()
def global_grad_norm(parameters, pp_group=None) -> torch.Tensor:
    """The 2-norm of all gradients of the whole model, identical on every rank.

    A sharded DTensor gradient contributes the sum of its shards' squares (reduced over the mesh
    dimensions it is split on); a replicated one, and a plain tensor, count once. Pipeline ranks
    hold disjoint parameters: their totals are summed over `pp_group`.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    device = (grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]).device if grads else "cpu"
    total = torch.zeros((), dtype=torch.float64, device=device)
    by_groups: dict[tuple, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=device))
    for grad in grads:
        if isinstance(grad, DTensor):
            if any(placement.is_partial() for placement in grad.placements):
                raise RuntimeError("partial-sum gradient: call reduce_partial_gradients() first")
            by_groups[_shard_groups(grad)] += grad.to_local().double().square().sum()
        else:
            total += grad.double().square().sum()
    for groups, squares in by_groups.items():
        for group in groups:
            dist.all_reduce(squares, group=group)
        total += squares
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


@torch.no_grad()
def clip_gradients(parameters, max_norm: float, pp_group=None) -> float:
    """Scale all gradients so that their global norm is at most max_norm; returns the norm before."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = global_grad_norm(parameters, pp_group)
    if max_norm > 0 and torch.isfinite(norm):
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in parameters:
            p.grad.mul_(scale.to(p.grad.dtype))
    return float(norm)
