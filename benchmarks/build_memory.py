"""Peak memory of building a model per rank against the full model's weights, at dp in {1, 2, 4}.

Each layout runs under torchrun (gloo, CPU, one thread per process) and builds the model as the
trainer does (pretrain.train.build_model_parts): on the meta device, parallelised there (FSDP2
over dp), then only the rank's shards allocated and initialised with the keyed initialisation.
The figure is the peak resident memory a rank adds during the build (the kernel's high-water
mark, VmHWM, reset through /proc/self/clear_refs just before; so Linux only), over the full
model's fp32 weights. A tiny model of the same layout is built first so that the code pages and
allocator arenas a first build touches are not counted. A build of the whole model before
sharding would be at least 1.0 at every dp; the target is about 1 / dp.

    python -m benchmarks.build_memory [--family dit|llada]   (default: both)
    torchrun ... benchmarks/build_memory.py --worker FAMILY OUT.json [overrides]   (one layout)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import re
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.env import detect_launch, init_distributed
from parallel.mesh import Layout, build_mesh
from pretrain.config import RunConfig, load_config, validate
from pretrain.models import ModelShape, count_parameters, get_family
from pretrain.train import build_model_parts, initialise_from

COMMON = ["model.seq_len=16", "model.vocab_multiple=8", "data.global_batch_size=8", "data.micro_batch_size=1",
          "train.seed=5"]
TINY = {"dit": ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.cond_dim=16", "model.vocab_size=50"],
        "llada": ["model.family=llada", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                  "model.mlp_hidden_size=48", "model.vocab_size=50"]}
# ~140 MB of fp32 weights: one row block of the keyed initialisation (1 MiB) and the allocator's
# slack are small beside a quarter of it.
SIZES = {"dit": ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.cond_dim=128",
                 "model.vocab_size=8192"],
         "llada": ["model.family=llada", "model.d_model=512", "model.n_layers=8", "model.n_heads=8",
                   "model.n_kv_heads=8", "model.mlp_hidden_size=1536", "model.vocab_size=8192"]}
DP_SIZES = (1, 2, 4)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as stream:
        return int(re.search(rf"^{field}:\s+(\d+) kB", stream.read(), re.M).group(1))


def build(overrides: list[str], rank: int, world: int) -> tuple[list[torch.nn.Module], RunConfig]:
    """This rank's parts of the model `overrides` describe, as the trainer builds them, and the
    resolved config."""
    cfg = load_config(None, [*COMMON, *overrides])
    validate(cfg, world)
    layout = Layout.of(cfg.parallel, rank, world)
    family, shape = get_family(cfg.model.family), ModelShape.of(cfg.model)
    cpu = torch.device("cpu")
    return build_model_parts(family, cfg, shape, layout, build_mesh(layout, cpu), cpu), cfg


def _peak_of(work) -> tuple[object, int]:
    """work() and the peak resident bytes it added (VmHWM reset just before)."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as stream:
        stream.write("5")  # reset VmHWM to the current resident size
    result = work()
    return result, (_status_kib("VmHWM") - before) * 1024


def weight_digests(parts: list[torch.nn.Module]) -> dict[str, str]:
    """Name -> sha256 of the full tensor (gathered from the shards: every rank of a part takes part)."""
    digests = {}
    for part in parts:
        for name, param in part.named_parameters():
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param
            digests[name] = hashlib.sha256(whole.detach().contiguous().numpy().tobytes()).hexdigest()
    return digests


def measure(family: str, out: str, overrides: list[str]) -> None:
    """In a torchrun worker: the peak resident bytes each rank adds while building the model of
    `family` with `overrides` (parallel.* ones set the layout), and with model.init_from=FILE
    (a checkpoint or consolidated file of that model) while loading it into the shards, and the
    digests of the weights loaded -> `out` (rank 0)."""
    several = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if several else (0, 1)
    build([*TINY[family], *[o for o in overrides if o.startswith("parallel.")]], rank, world)  # warm-up
    (parts, cfg), peak = _peak_of(lambda: build([*SIZES[family], *overrides], rank, world))
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for part in parts
               for p in part.parameters())
    row = {"rank": rank, "peak_bytes": peak, "shard_bytes": 4 * held}
    if cfg.model.init_from:
        shape = ModelShape.of(cfg.model)
        _, row["load_peak_bytes"] = _peak_of(lambda: initialise_from(get_family(family), cfg, shape, parts))
        row["loaded"] = weight_digests(parts)
    rows = [row] * world
    if several:
        dist.all_gather_object(rows, row)
    if rank == 0:
        total = count_parameters(get_family(family).build(cfg.model, ModelShape.of(cfg.model), device="meta"))
        Path(out).write_text(json.dumps({"full_bytes": 4 * total, "ranks": rows}, indent=1))


def run(args: argparse.Namespace | None = None) -> list[dict]:
    from tests.helpers import torchrun

    args = args or _parser().parse_args([])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in [args.family] if args.family else sorted(SIZES):
            for dp in DP_SIZES:
                out = Path(tmp) / f"{family}-dp{dp}.json"
                torchrun(dp, "benchmarks/build_memory.py", "--worker", family, str(out), f"parallel.dp={dp}",
                         timeout=900)
                measured = json.loads(out.read_text())
                full = measured["full_bytes"]
                peak = max(r["peak_bytes"] for r in measured["ranks"])
                rows.append({"name": f"build_memory_{family}_dp{dp}", "value": round(peak / full, 3), "unit": "ratio",
                             "what": f"peak resident memory a rank adds while building a {full / 2**20:.0f} MiB "
                                     f"{family} at dp={dp} (meta device, FSDP2 over dp, keyed init), the largest over "
                                     f"ranks, / the full model's fp32 weights; target about 1/{dp}"})
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(SIZES), help="one family (default: both)")
    parser.add_argument("--worker", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.worker:
        family, out, *overrides = args.worker
        init_distributed(detect_launch(), "cpu", 60.0)
        measure(family, out, overrides)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return
    for row in run(args):
        print(f"{row['name']} = {row['value']} {row['unit']}  ({row['what']})")


if __name__ == "__main__":
    main()
