"""Keyed initialisation and materialisation of models built on the meta device.

A model is built on the meta device (no memory), parallelised there (tensor parallel, FSDP2),
and only then given storage: each rank allocates its local shards (`to_empty`) and fills them.
So that the weights are the same on every layout, a parameter's values are a function of the
run's seed, the parameter's name and the element's position only, never of the rank, of the
order modules are built in, or of the global RNG:

- a parameter of shape [R, ...] is cut into row blocks of `rows_per_block(shape)` rows (a
  function of its shape alone);
- block k is drawn from a CPU torch.Generator seeded with hash(seed, name, k), on the family's
  distribution for that parameter (an `Init`);
- a rank draws only the blocks its shard's rows meet and copies out its slice (the columns of a
  dim-1 shard are cut from the full rows of the block).

The memory a rank needs beyond its shards is one row block (ROW_BLOCK_ELEMENTS floats, or one
row of a parameter with longer rows). Values are drawn on the CPU in float32 whatever the
device, so a CUDA run starts from the same weights as a CPU one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

ROW_BLOCK_ELEMENTS = 1 << 18  # 1 MiB of float32 per block: the extra memory of initialising one parameter


@dataclass(frozen=True)
class Init:
    """The distribution of one parameter's values: uniform on [low, high], normal(mean, std) or
    a constant `value`."""

    kind: str
    """"uniform", "normal" or "constant"."""
    low: float = 0.0
    high: float = 0.0
    mean: float = 0.0
    std: float = 0.0
    value: float = 0.0

    @classmethod
    def uniform(cls, bound: float) -> Init:
        return cls("uniform", low=-bound, high=bound)

    @classmethod
    def normal(cls, std: float, mean: float = 0.0) -> Init:
        return cls("normal", mean=mean, std=std)

    @classmethod
    def constant(cls, value: float) -> Init:
        return cls("constant", value=value)

    def draw(self, out: torch.Tensor, generator: torch.Generator) -> None:
        """Fill `out` (float32, CPU) from `generator`."""
        if self.kind == "uniform":
            out.uniform_(self.low, self.high, generator=generator)
        elif self.kind == "normal":
            out.normal_(self.mean, self.std, generator=generator)
        else:
            out.fill_(self.value)


Rule = Callable[[str, nn.Module, str], Init]
"""rule(module_name, module, parameter_name) -> the Init of that parameter (its name relative to
the module: "weight", "bias")."""


def block_seed(seed: int, name: str, block: int) -> int:
    """The generator seed of row block `block` of parameter `name` in a run seeded `seed`."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rows_per_block(shape: tuple[int, ...]) -> int:
    """Rows of a parameter of `shape` drawn from one generator: a function of the shape alone, so
    every layout cuts the same blocks."""
    row = math.prod(shape[1:])
    return max(1, ROW_BLOCK_ELEMENTS // max(row, 1))


def local_part(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """This rank's tensor of `param` (a plain tensor or a DTensor shard), the full shape, and
    where the local tensor starts in it."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        assert tuple(local.shape) == tuple(shape), (local.shape, shape)
        return local, tuple(param.shape), tuple(offset)
    return param, tuple(param.shape), (0,) * param.dim()


def _slice_of_full(full_rows: torch.Tensor, offset: tuple[int, ...], local_shape: tuple[int, ...]) -> torch.Tensor:
    """The columns (dims 1..) of `full_rows` that a shard at `offset` of `local_shape` holds."""
    for dim in range(1, full_rows.dim()):
        full_rows = full_rows.narrow(dim, offset[dim], local_shape[dim])
    return full_rows


@torch.no_grad()
def fill_keyed(param: torch.Tensor, name: str, init: Init, seed: int) -> None:
    """Fill this rank's part of parameter `name` with its keyed values."""
    local, shape, offset = local_part(param)
    if init.kind == "constant":
        local.fill_(init.value)
        return
    if local.numel() == 0:  # an uneven FSDP2 shard can hold no rows
        return
    if local.dim() == 0:  # a scalar is one block of one row
        shape, offset, local = (1,), (0,), local.view(1)
    first, last = offset[0], offset[0] + local.shape[0]
    per = rows_per_block(shape)
    for block in range(first // per, -(-last // per)):
        start, stop = block * per, min((block + 1) * per, shape[0])
        values = torch.empty((stop - start, *shape[1:]), dtype=torch.float32)
        init.draw(values, torch.Generator().manual_seed(block_seed(seed, name, block)))
        lo, hi = max(start, first), min(stop, last)
        piece = _slice_of_full(values[lo - start:hi - start], offset, tuple(local.shape))
        local[lo - first:hi - first].copy_(piece)


def keyed_init(model: nn.Module, seed: int, rule: Rule) -> None:
    """Initialise every parameter of `model` (whole, a pipeline stage, or sharded) by `rule`,
    keyed by `seed` and the parameter's name in the model."""
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            fill_keyed(param, name, rule(module_name, module, param_name), seed)


def materialise(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Give a model built (and parallelised) on the meta device storage on `device` for this
    rank's shards only, recompute its non-persistent buffers, then initialise it keyed by `seed`
    (`model.init_weights(seed)`, the family's rules)."""
    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    model.init_weights(seed)
    return model


def build_then_materialise(model: nn.Module, build: Callable[[], None], device: torch.device | str | None,
                           seed: int) -> None:
    """A family model's constructor body: `build()` (which creates its modules) runs on the meta
    device; then, unless `device` is "meta", the model is materialised on `device` (default
    torch's default device) and initialised keyed by `seed`."""
    with torch.device("meta"):
        build()
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type != "meta":
        materialise(model, device, seed)


@torch.no_grad()
def copy_full_into_local(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` (the whole tensor, any device) into `param` (plain or a
    DTensor shard): loading weights into a sharded model without distributing them first."""
    local, shape, offset = local_part(param)
    if tuple(full.shape) != shape:
        raise ValueError(f"shape {tuple(full.shape)} does not fit a parameter of shape {shape}")
    piece = full
    for dim in range(full.dim()):
        piece = piece.narrow(dim, offset[dim], local.shape[dim])
    local.copy_(piece)
