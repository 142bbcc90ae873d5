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
        """cos and signed sin tables [1, L, 1, head_dim] for `apply_rotary`, computed once per
        length and device; inside a torch.compile graph (parallel.compile) at every call,
        uncached: there they fuse into the rotation, and setting the cache there is a side effect
        that a checkpointed region cannot hold (dynamo would run the whole block eagerly)."""
        if torch.compiler.is_compiling():
            return self._tables_for(seq_len, device)
        key = (seq_len, device)
        if getattr(self, "_key", None) != key:
            self._key, self._tables = key, self._tables_for(seq_len, device)
        return self._tables

    def _tables_for(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, self.inv_freq.to(device))
        cos, sin = freqs.cos(), freqs.sin()
        # rotate-half's sign goes into the table: x * cos + [x2, x1] * [-sin, sin] is the rotation
        # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] without negating half of x at every call.
        return (torch.cat([cos, cos], dim=-1)[None, :, None, :],
                torch.cat([-sin, sin], dim=-1)[None, :, None, :])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, L, ..., head_dim] (heads, or heads and q/k side by side); cos and signed sin from
    `Rotary`. Computed in fp32 (as upstream), returned in x's dtype."""
    if x.dim() > cos.dim():  # broadcast the tables over the extra middle dimensions
        table_shape = (*cos.shape[:-1], *([1] * (x.dim() - cos.dim())), cos.shape[-1])
        cos, sin = cos.view(table_shape), sin.view(table_shape)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.float()
        # [x1, x2] -> [x2, x1] as one roll: one kernel forward and one (the opposite roll)
        # backward, where cat of two slices costs zero fills, copies and an add in backward.
        swapped = torch.roll(xf, xf.shape[-1] // 2, dims=-1)
        return torch.addcmul(xf * cos, swapped, sin).to(x.dtype)
