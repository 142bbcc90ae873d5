"""AdamW, the learning-rate schedule and the EMA of the weights."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.data_parallel import reshard_parameters
from pretrain.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # Both are elementwise per tensor, so a shard's update equals the same slice of the whole
    # tensor's: exact for plain tensors and DTensors alike (foreach's grouping is not used).
    return torch.optim.AdamW(_same_kind_groups(model), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, **implementation_flags(cfg))


def _same_kind_groups(model: nn.Module) -> list[dict]:
    """The parameters in one group per kind: plain tensors, and DTensors per device mesh. The fused
    kernel takes a group's tensors in one call, which cannot mix the two (under tensor parallelism
    alone the embedding and norms stay plain while the projections are DTensors). Checkpoints
    keep optimizer state per parameter name, so the grouping never shows in them."""
    groups: dict[object, list[nn.Parameter]] = {}
    for param in model.parameters():
        groups.setdefault(param.device_mesh if isinstance(param, DTensor) else None, []).append(param)
    return [{"params": params} for params in groups.values()]


def implementation_flags(cfg: OptimConfig) -> dict[str, bool | None]:
    """AdamW's keyword arguments (and param-group entries) for optim.implementation."""
    return {"fused": True, "foreach": None} if cfg.implementation == "fused" else {"fused": None, "foreach": False}


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warm-up, then constant or cosine.

    Upstream's get_constant_schedule_with_warmup gives the first step a learning rate of 0; here
    step k of the warm-up runs at (k + 1) / warmup_steps, so no step is spent at lr = 0.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Optimizers:
    """One AdamW per model part (the pipeline stages a rank holds), stepped together."""

    def __init__(self, parts: list[nn.Module], cfg: OptimConfig):
        self.parts, self.cfg = parts, cfg
        self.optimizers = [build_optimizer(part, cfg) for part in parts]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def reapply_config(self) -> None:
        """This run's optim settings again after loading a checkpoint: loading puts back the param
        groups of the run that saved it (its betas, eps, weight decay and implementation), which
        would silently override a config changed on resume. The learning rate is set every step."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group.update(betas=self.cfg.betas, eps=self.cfg.eps, weight_decay=self.cfg.weight_decay,
                             **implementation_flags(self.cfg))

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            set_lr(optimizer, lr)

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]


class EMA:
    """Exponential moving average of the parameters, with upstream's warm-up min(decay, (1+n)/(10+n)).

    The shadow tensors mirror the parameters (plain tensors, or DTensors sharded like them) of all
    the model parts a rank holds, by parameter name, so the EMA checkpoints and reshards exactly
    like the model.
    """

    def __init__(self, parts: list[nn.Module], decay: float):
        self.parts, self.decay = parts, decay
        self.num_updates = 0
        self.shadow = {name: p.detach().clone() for name, p in self._named_parameters()}

    def _named_parameters(self):
        for part in self.parts:
            yield from part.named_parameters()

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, p in self._named_parameters():
            self.shadow[name].lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the parts' weights with the EMA's (call twice to swap back)."""
        for part in self.parts:
            # After a no-grad forward, ddp and fsdp_no_reshard units still hold gathered full
            # tensors where the shadow mirrors their shards: back to the shards first.
            reshard_parameters(part)
        for name, p in self._named_parameters():
            tmp = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name].copy_(tmp)


class EMAWeights:
    """Context manager: the model parts hold the EMA weights inside the block (their own without an EMA)."""

    def __init__(self, ema: EMA | None):
        self.ema = ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.swap()
        return self

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.swap()
        return False
