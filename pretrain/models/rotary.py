"""Rotary position embedding (rotate-half / NeoX layout), shared by the model families."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half / NeoX layout) for q and k."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        # Not persistent: a function of head_dim and base, recomputed on load (also on meta devices).
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def reset_buffers(self) -> None:
        """Recompute inv_freq in place: a model built on the meta device gets it back after to_empty."""
        with torch.no_grad():
            self.inv_freq.copy_(self._inv_freq())
        self._key = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [1, L, 1, head_dim], computed once per length and device; inside a
        torch.compile graph (parallel.compile) at every call, uncached: there they fuse into the
        rotation, and setting the cache there is a side effect that a checkpointed region cannot
        hold (dynamo would run the whole block eagerly)."""
        if torch.compiler.is_compiling():
            return self._tables_for(seq_len, device)
        key = (seq_len, device)
        if getattr(self, "_key", None) != key:
            self._key, self._tables = key, self._tables_for(seq_len, device)
        return self._tables

    def _tables_for(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, self.inv_freq.to(device))
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, L, H, head_dim]; rotation computed in fp32 (as upstream), returned in x's dtype."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)
