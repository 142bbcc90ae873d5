"""AdamW, the learning-rate schedule and the EMA of the weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # foreach=False keeps AdamW exact and identical for plain tensors and DTensors alike.
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False)


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


class EMA:
    """Exponential moving average of the parameters, with upstream's warm-up min(decay, (1+n)/(10+n)).

    The shadow tensors mirror the parameters (plain tensors, or DTensors sharded like them), so
    the EMA checkpoints and reshards exactly like the model.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's weights with the EMA's (call twice to swap back)."""
        for name, p in model.named_parameters():
            tmp = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name].copy_(tmp)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)
        self.num_updates = int(state["num_updates"])


class EMAWeights:
    """Context manager: the model holds the EMA weights inside the block (or its own if no EMA)."""

    def __init__(self, model: nn.Module, ema: EMA | None):
        self.model, self.ema = model, ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.swap(self.model)
        return self.model

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.swap(self.model)
        return False
