"""Tensor-parallel pieces that any model family's plan and any objective can use.

- `sum_gradient_hook`: a forward hook whose backward sums the output's gradient over a group
  (Megatron's copy-to-region), for a replicated output consumed by sequence-sharded activations.
- Vocabulary-parallel operations on logits sharded over the (padded) vocabulary: bias, argmax and
  cross entropy (loss parallel), exact without gathering the logits; each also takes a plain
  tensor (one process, or tp = 1).
- The output projection applied to chunks of tokens (`gather_head_input`, `project_vocab`), for
  losses that never hold the logits of all tokens at once; vocabulary-parallel under tp.

The per-module plans (which layer is column- or row-wise) live beside each model family
(pretrain/models/<family>/parallelize.py), not here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard


class _AllReduceGradient(torch.autograd.Function):
    """Identity forward; backward sums the gradient over `group` (Megatron's copy-to-region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_gradient_hook(group):
    """A forward hook: identity forward, gradient summed over `group` in backward."""

    def hook(module, inputs, output):
        return _AllReduceGradient.apply(output, group)

    return hook


# ---------------------------------------------------------------------------------------------
# Vocabulary-parallel operations: each works on a plain tensor too (one process, or tp = 1).


def _vocab_shard(scores: DTensor) -> tuple[torch.Tensor, int, DeviceMesh]:
    """This rank's slice of the vocabulary, its first global index, and the tensor-parallel mesh."""
    if len(scores.placements) != 1 or scores.placements[0] != Shard(scores.ndim - 1):
        raise ValueError(f"expected logits sharded on the vocabulary, got {scores.placements}")
    local = scores.to_local()
    mesh = scores.device_mesh
    offset = mesh.get_local_rank() * local.shape[-1]  # even split: the vocabulary is padded to a multiple of tp
    return local, offset, mesh


def add_vocab_bias(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """scores + bias[V] along the (possibly sharded) vocabulary dimension."""
    if not isinstance(scores, DTensor):
        return scores + bias.to(scores.dtype)
    local, offset, mesh = _vocab_shard(scores)
    shifted = local + bias[offset: offset + local.shape[-1]].to(local.dtype)
    return DTensor.from_local(shifted, mesh, scores.placements, run_check=False)


def vocab_index(scores: torch.Tensor) -> torch.Tensor:
    """Global vocabulary ids of this rank's columns of `scores`."""
    if not isinstance(scores, DTensor):
        return torch.arange(scores.shape[-1], device=scores.device)
    local, offset, _ = _vocab_shard(scores)
    return torch.arange(offset, offset + local.shape[-1], device=local.device)


def local_scores(scores: torch.Tensor) -> torch.Tensor:
    return scores.to_local() if isinstance(scores, DTensor) else scores


def with_local(scores: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` (this rank's columns, changed) wrapped like `scores` again."""
    if not isinstance(scores, DTensor):
        return local
    return DTensor.from_local(local, scores.device_mesh, scores.placements, run_check=False)


@torch.no_grad()
def vocab_argmax(scores: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary, exact over a sharded vocabulary (ties: the lowest id, as torch)."""
    if not isinstance(scores, DTensor):
        return scores.argmax(-1)
    local, offset, mesh = _vocab_shard(scores)
    best, index = local.max(-1)
    group = mesh.get_group()
    size = dist.get_world_size(group)
    all_best = [torch.empty_like(best) for _ in range(size)]
    all_index = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(all_best, best.contiguous(), group=group)
    dist.all_gather(all_index, (index + offset).contiguous(), group=group)
    # Ranks hold increasing id ranges, so the first rank with the maximum holds the lowest id.
    winner = torch.stack(all_best).argmax(0, keepdim=True)
    return torch.stack(all_index).gather(0, winner)[0]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """-log softmax(logits)[target] with the vocabulary split over `group`: three all-reduces of
    [N] vectors (max, sum of exponentials, target logit); the logits are never gathered."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, target: torch.Tensor, offset: int, group) -> torch.Tensor:
        local = local.float()
        top = local.max(-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = local - top[:, None]
        exp = shifted.exp()
        total = exp.sum(-1)
        dist.all_reduce(total, group=group)
        owned = (target >= offset) & (target < offset + local.shape[-1])
        column = (target - offset).clamp(0, local.shape[-1] - 1)
        picked = shifted.gather(-1, column[:, None])[:, 0] * owned
        dist.all_reduce(picked, group=group)
        ctx.save_for_backward(exp / total[:, None], owned, column)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, owned, column = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(-1, column[:, None], -owned[:, None].to(softmax.dtype))
        return grad_logits * grad[:, None], None, None, None


def vocab_cross_entropy(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(scores)[target] per position, fp32, as a plain tensor shaped like target.
    Over a sharded vocabulary this is loss-parallel: the logits are never gathered."""
    if not isinstance(scores, DTensor):
        return F.cross_entropy(scores.float().flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
    local, offset, mesh = _vocab_shard(scores)
    nll = _VocabParallelCrossEntropy.apply(local.flatten(0, -2), target.flatten(), offset, mesh.get_group())
    return nll.view(target.shape)


# ---------------------------------------------------------------------------------------------
# The output projection, chunk by chunk: logits = features @ W^T + b for some tokens at a time.


def gather_head_input(features: torch.Tensor, head: nn.Linear, sequence_sharded: bool) -> torch.Tensor:
    """The input of the output projection `head`, whole on this rank, as a plain tensor.

    Without tensor parallelism this is `features`. With the head's weight sharded over the
    vocabulary (rows, a DTensor), every rank multiplies all tokens by its rows: the features are
    gathered along the sequence when sequence-parallel (dim 1 of [B, L, d]); in backward each
    rank's gradient is a partial sum over its vocabulary slice, so it is summed over the group
    (reduce-scatter, or all-reduce for replicated features), what the column-wise plan's input
    layout does for the whole-logits head.
    """
    weight = head.weight
    if not isinstance(weight, DTensor):
        return features
    mesh = weight.device_mesh
    stream = DTensor.from_local(features, mesh, [Shard(1) if sequence_sharded else Replicate()], run_check=False)
    return stream.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])


def project_vocab(features: torch.Tensor, head: nn.Linear, bias: torch.Tensor) -> torch.Tensor:
    """fp32 logits head(features) + bias[V] of some tokens ([N, d] -> [N, V]), sharded over the
    vocabulary (a DTensor, Shard(-1)) when the head's weight is (`features` from gather_head_input).

    `bias` (e.g. -inf at ids that can never be predicted) is folded into the head's own bias, so
    the logits are written once, not once more by an out-of-place add. The one exception is a
    head whose weight is not materialised outside its forward (DeepSpeed ZeRO-3 partitions it):
    that one is called as a module, so its engine gathers the weight, and the bias is added after.
    """
    weight = head.weight
    if isinstance(weight, DTensor):
        local = weight.to_local()
        offset = weight.device_mesh.get_local_rank() * local.shape[0]  # even split (the vocabulary is padded)
        logits = F.linear(features, local, _folded_bias(head, local, bias, offset)).float()
        return DTensor.from_local(logits, weight.device_mesh, [Shard(logits.ndim - 1)], run_check=False)
    if weight.numel() == 0:
        return add_vocab_bias(head(features).float(), bias)
    return F.linear(features, weight, _folded_bias(head, weight, bias, 0)).float()


def _folded_bias(head: nn.Linear, local: torch.Tensor, bias: torch.Tensor, offset: int) -> torch.Tensor:
    """This rank's slice of `bias` added to the head's own bias (differentiable in the latter)."""
    shift = bias[offset: offset + local.shape[0]]
    own = head.bias.to_local() if isinstance(head.bias, DTensor) else head.bias
    return shift.to(local.dtype) if own is None else own + shift.to(own.dtype)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would multiply `tensor` in: autocast's when it is on, else its own."""
    kind = tensor.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else tensor.dtype


class _ProjectedCrossEntropy(torch.autograd.Function):
    """-log softmax(x W^T + b)[target] for some tokens, the output projection fused in, over the
    whole vocabulary or this rank's slice of it (`group`: three all-reduces of [N] vectors, as
    in loss parallelism). Saves only its inputs and the log-normaliser: backward recomputes the
    logits and turns them, in place, into their gradient, so one [N, V] buffer is live where
    autograd's projection plus cross entropy keeps the logits, the log-softmax and two gradients.
    Also returns the fp32 logits, without gradient, for the argmax or draw taken from them."""

    @staticmethod
    def forward(ctx, features, weight, bias, target, offset: int, group):
        dtype = _compute_dtype(weight)
        with torch.autocast(features.device.type, enabled=False):
            logits = F.linear(features.to(dtype), weight.to(dtype), bias.to(dtype)).float()
        top = logits.max(-1).values
        if group is not None:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        total = (logits - top[:, None]).exp_().sum(-1)
        owned = (target >= offset) & (target < offset + logits.shape[-1])
        column = (target - offset).clamp(0, logits.shape[-1] - 1)
        picked = logits.gather(-1, column[:, None])[:, 0] * owned
        if group is not None:
            dist.all_reduce(total, group=group)
            dist.all_reduce(picked, group=group)
        log_normaliser = top + total.log()
        ctx.save_for_backward(features, weight, bias, log_normaliser, owned, column)
        ctx.dtype = dtype
        ctx.mark_non_differentiable(logits)
        ctx.set_materialize_grads(False)  # no [N, V] zeros for the logits' (absent) gradient
        return log_normaliser - picked, logits

    @staticmethod
    def backward(ctx, grad_nll, _grad_logits):
        if grad_nll is None:  # the loss never used these tokens' -log p
            return None, None, None, None, None, None
        features, weight, bias, log_normaliser, owned, column = ctx.saved_tensors
        dtype = ctx.dtype
        x, w = features.to(dtype), weight.to(dtype)
        with torch.autocast(features.device.type, enabled=False):
            grad = F.linear(x, w, bias.to(dtype)).float()
        grad.sub_(log_normaliser[:, None]).exp_()  # softmax
        grad.scatter_add_(-1, column[:, None], -owned[:, None].to(grad.dtype))
        grad = grad.mul_(grad_nll[:, None]).to(dtype)
        grad_features = (grad @ w).to(features.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad.t() @ x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return grad_features, grad_weight, grad_bias, None, None, None


def projected_nll(features: torch.Tensor, head: nn.Linear, bias: torch.Tensor,
                  target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(target) per token of head(features) + bias[V] ([N, d] -> [N]), and those fp32
    logits without gradient (a vocabulary-sharded DTensor under tensor parallelism, as
    `project_vocab` returns them), computed by one fused function that never keeps the logits
    for backward. The head's weight must be materialised (not partitioned by ZeRO-3)."""
    weight = head.weight
    if isinstance(weight, DTensor):
        local = weight.to_local()
        mesh = weight.device_mesh
        offset = mesh.get_local_rank() * local.shape[0]  # even split (the vocabulary is padded)
        nll, logits = _ProjectedCrossEntropy.apply(features, local, _folded_bias(head, local, bias, offset), target,
                                                   offset, mesh.get_group())
        return nll, DTensor.from_local(logits, mesh, [Shard(logits.ndim - 1)], run_check=False)
    return _ProjectedCrossEntropy.apply(features, weight, _folded_bias(head, weight, bias, 0), target, 0, None)
