"""The device mesh: pipeline x data x tensor parallel, from the config, checked up front.

Dimensions are ("pp", "dp_replicate", "dp_shard", "tp"). Data parallelism is one of the two dp
dimensions, the other has size 1: `parallel.data_parallel=ddp` replicates parameters over
dp_replicate, `fsdp` shards them over dp_shard (FSDP2 treats the pair as HSDP, so both are one
code path). Tensor-parallel ranks vary fastest (neighbours on one node share the most traffic),
pipeline stages slowest: global rank r sits at pp = r // (dp * tp), dp = (r // tp) % dp,
tp = r % tp. Every rank of a tensor/pipeline group has the same dp coordinate, reads the same
batches and draws the same masks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.config import ParallelConfig

DP_DIMS = ("dp_replicate", "dp_shard")


@dataclass(frozen=True)
class Layout:
    """Sizes and this rank's coordinates in the (pp, dp, tp) grid."""

    dp: int
    tp: int
    pp: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    replicate: bool  # data parallelism replicates parameters (ddp) instead of sharding them (fsdp)

    @classmethod
    def of(cls, cfg: ParallelConfig, rank: int, world_size: int) -> Layout:
        dp, tp, pp = cfg.resolve_dp(world_size), cfg.tp, cfg.pp
        return cls(dp=dp, tp=tp, pp=pp, dp_rank=(rank // tp) % dp, tp_rank=rank % tp, pp_rank=rank // (dp * tp),
                   replicate=cfg.data_parallel == "ddp")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def describe(self) -> str:
        kind = "replicated" if self.replicate else "sharded"
        return f"dp={self.dp} ({kind}) x tp={self.tp} x pp={self.pp}"


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh | None:
    """The 4-D mesh, or None for one process. Use `dp_mesh(mesh)` for the data-parallel group."""
    if layout.world_size == 1:
        return None
    shape = (layout.pp, layout.dp, 1, layout.tp) if layout.replicate else (layout.pp, 1, layout.dp, layout.tp)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("pp", *DP_DIMS, "tp"))
    # One group over all data-parallel ranks (both dp dimensions), for loss and metric sums. Popped
    # first: meshes of equal shape compare equal, and an entry keyed by an earlier one (a trainer
    # before this one in the same process) would vanish with it when it is garbage-collected.
    _FLAT_DP.pop(mesh, None)
    _FLAT_DP[mesh] = mesh[DP_DIMS]._flatten("dp")
    return mesh


_FLAT_DP: "weakref.WeakKeyDictionary[DeviceMesh, DeviceMesh]" = weakref.WeakKeyDictionary()


def dp_group(mesh: DeviceMesh | None):
    """Process group of the data-parallel ranks sharing this rank's tp/pp coordinates (None: one process)."""
    return None if mesh is None else _FLAT_DP[mesh].get_group()
