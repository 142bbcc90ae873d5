"""Run under torchrun by tests/test_meta.py (gloo, CPU); the memory of a build is measured by
benchmarks/build_memory.py's worker.

    same OUT.json    both families built on every layout this world size allows and in one process:
                     digests of the gathered weights, and each rank's share of them

Rank 0 writes OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import pretrain.models.init as keyed
from parallel.env import detect_launch, init_distributed
from parallel.mesh import Layout, build_mesh
from pretrain.config import load_config, validate
from pretrain.models import ModelShape, count_parameters, get_family
from pretrain.train import build_model_parts
from tests.dist.parallel_worker import digest

SIZES = {"dit": ["model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.cond_dim=16"],
         # an MLP width that shards unevenly under FSDP2 (25 rows of a tp shard over dp=2)
         "llada": ["model.family=llada", "model.d_model=32", "model.n_layers=4", "model.n_heads=4",
                   "model.n_kv_heads=2", "model.mlp_hidden_size=50"]}
COMMON = ["model.vocab_size=50", "model.seq_len=16", "model.vocab_multiple=8", "data.global_batch_size=8",
          "data.micro_batch_size=1", "train.seed=5"]
PP = ["parallel.pp=2", "train.step_mode=two_pass"]
LAYOUTS = {4: [["parallel.dp=2", "parallel.tp=2"], ["parallel.dp=2", "parallel.tp=2", "parallel.data_parallel=ddp"],
               [*PP, "parallel.tp=2"], [*PP, "parallel.dp=2"],
               [*PP, "parallel.dp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
               ["parallel.dp=4"]]}


def build(overrides: list[str], rank: int, world: int) -> tuple[list[torch.nn.Module], int]:
    """This rank's parts of the model `overrides` describe, as the trainer builds them; and the full
    model's parameter count."""
    cfg = load_config(None, overrides)
    validate(cfg, world)
    layout = Layout.of(cfg.parallel, rank, world)
    family, shape = get_family(cfg.model.family), ModelShape.of(cfg.model)
    parts = build_model_parts(family, cfg, shape, layout, build_mesh(layout, torch.device("cpu")),
                              torch.device("cpu"))
    return parts, count_parameters(family.build(cfg.model, shape, device="meta"))


def gathered_digests(parts: list[torch.nn.Module]) -> tuple[dict[str, str], int]:
    """Digests of every parameter of the model (the full tensors, from whichever ranks hold them),
    and how many elements this rank holds."""
    local, held = {}, 0
    for part in parts:
        for name, param in part.named_parameters():
            local[name] = digest(param)  # full_tensor() of a DTensor: a collective of its mesh's ranks
            held += (param.to_local() if hasattr(param, "to_local") else param).numel()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local, held
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    return {name: value for ranks in every for name, value in ranks.items()}, held


def same(out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    keyed.ROW_BLOCK_ELEMENTS = 40  # blocks of one or two rows: block edges fall inside and across shards
    results = []
    for family, size in SIZES.items():
        base = [*COMMON, *size]
        reference, total = build(base, 0, 1)
        expected = {name: digest(param) for name, param in reference[0].named_parameters()}
        for layout in LAYOUTS[world]:
            parts, _ = build([*base, *layout], rank, world)
            found, held = gathered_digests(parts)
            shares = [None] * world
            dist.all_gather_object(shares, held)
            results.append({"family": family, "layout": " ".join(layout),
                            "names_match": sorted(found) == sorted(expected),
                            "differ": sorted(n for n in expected if found.get(n) != expected[n]),
                            "max_share": max(shares) / total})
    if rank == 0:
        with open(out, "w") as stream:
            json.dump(results, stream, indent=1)


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    init_distributed(detect_launch(), "cpu", 60.0)
    if command == "same":
        same(args[0])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
