"""Randomness that does not depend on the parallel layout.

The noise level t, the masks and any sampled corrector input are pure functions of
(seed, stream, global sample position, token index[, vocabulary index]): a counter-based hash,
not a stateful generator. Every rank of a tensor- or pipeline-parallel group computes the same
values without communicating, data-parallel ranks differ because they hold different positions,
and the same global batch gets the same masks on any layout, after any resume, on CPU or GPU.
The only stateful randomness left is dropout, which `seed_dropout` reseeds every step from
(seed, step, rank), so a checkpoint needs no generator state to resume exactly.

The hash is Wellons' "lowbias32" integer mixer evaluated with int64 tensor arithmetic that never
overflows (32-bit products are split in 16-bit halves), so results are bit-identical everywhere.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF

# Independent streams of the training step.
STREAM_T = 1
STREAM_MASK = 2
STREAM_CORRECTOR_SAMPLE = 3
STREAM_SAMPLER = 4
STREAM_LABEL_DROPOUT = 5  # classifier-free guidance: which labels become the null class


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for 0 <= x < 2**32, exact in int64."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(state: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """Fold a (up to 64-bit, non-negative) key into the hash state."""
    value = torch.as_tensor(value, dtype=torch.int64, device=state.device)
    state = _mix32(state ^ (value & _MASK32))
    return _mix32(state ^ ((value >> 32) & _MASK32))


def keyed_bits(seed: int, stream: int, *keys: torch.Tensor | int) -> torch.Tensor:
    """32 random bits (as int64) for every element of the broadcast of `keys`."""
    device = next((k.device for k in keys if isinstance(k, torch.Tensor)), torch.device("cpu"))
    state = torch.tensor(seed & _MASK32, dtype=torch.int64, device=device)
    state = _absorb(_absorb(state, seed >> 32), stream)
    for key in keys:
        state = _absorb(state, key)
    return state


def keyed_uniform(seed: int, stream: int, *keys: torch.Tensor | int) -> torch.Tensor:
    """Uniform floats in [0, 1) (24 random bits, exact in float32), one per broadcast key."""
    return (keyed_bits(seed, stream, *keys) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def keyed_gumbel(seed: int, stream: int, *keys: torch.Tensor | int) -> torch.Tensor:
    """Standard Gumbel noise, one per broadcast key (for sampling with argmax(logits + g))."""
    u = keyed_uniform(seed, stream, *keys).double()
    # u in [0, 1): shift to the open interval (0, 1) before the double log.
    return -torch.log(-torch.log((u + 0.5 / (1 << 24)))).float()


def seed_dropout(seed: int, step: int, rank: int) -> None:
    """Reseed torch's generators for this step's dropout masks (the only stateful randomness)."""
    key = int(keyed_bits(seed, 0, step, rank))
    torch.manual_seed(key)
