"""Run under torchrun (2 processes, gloo, CPU) by tests/test_stream_import.py: Hugging Face folders
in a family's published layout streamed into the shards of model.init_from, in one launch.

    same CASES.json OUT.json

CASES.json: [{"name", "folder", "overrides"}]: a folder and the model config it fits. For each,
the weights of a one-process load that reads the folder whole (`Source.load`, re-padded), then
those loaded at dp=2 (FSDP2), tp=2 and pp=2 by model.init_from (`initialise_from`, which streams):
digests of the gathered weights, the bytes each rank read from the files, and (on the dp2 row)
the bytes of the stored tensors read as slices and of those read whole to be combined.
Rank 0 writes OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import pretrain.convert.stream as stream
from parallel.env import detect_launch, init_distributed
from parallel.mesh import Layout, build_mesh
from pretrain.config import load_config, validate
from pretrain.convert import hf_folder
from pretrain.convert.layouts import resize_vocab
from pretrain.convert.source import open_init_source
from pretrain.convert.stream import plan_reads
from pretrain.models import ModelShape, get_family
from pretrain.train import build_model_parts, initialise_from
from tests.dist.meta_worker import gathered_digests
from tests.dist.parallel_worker import digest

COMMON = ["model.vocab_size=50", "model.seq_len=16", "model.vocab_multiple=8", "data.global_batch_size=8",
          "data.micro_batch_size=1", "train.seed=5"]
LAYOUTS = {"dp2": ["parallel.dp=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2", "train.step_mode=two_pass"]}


class ReadCounter:
    """Wraps stream.read_tensor: the bytes this process has read from weight files."""

    def __init__(self):
        self.bytes = 0
        self.read = stream.read_tensor
        stream.read_tensor = self

    def __call__(self, file, key, index=None):
        tensor = self.read(file, key, index)
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor


def whole_load(overrides: list[str]) -> dict[str, str]:
    """Digests of the weights a one-process load that reads the whole folder gives."""
    cfg = load_config(None, overrides)
    source = open_init_source(cfg)
    family = get_family(cfg.model.family)
    weights = resize_vocab(family, source.load(), cfg.model.vocab_size, ModelShape.of(cfg.model).vocab_size)
    return {name: digest(tensor) for name, tensor in weights.items()}


def stored_bytes(overrides: list[str]) -> dict[str, int]:
    """Bytes of the folder's stored tensors that parameters are renamed from ("renamed": at dp=2
    each should be read by one rank, its half) and that are combined ("combined": read whole)."""
    source = open_init_source(load_config(None, overrides))
    family = get_family(source.run.model.family)
    shapes, files = hf_folder.read_shapes(source.path), hf_folder.tensor_files(source.path)
    plan = plan_reads(family, source.run.model, source.shapes, shapes, official=True)
    found = {"renamed": 0, "combined": 0}
    for keys, combine in plan.values():
        for key in keys:
            element = hf_folder.read_tensor(files[key], key, (slice(0, 0),)).element_size()
            found["combined" if combine else "renamed"] += element * torch.Size(shapes[key]).numel()
    return found


def same(cases_file: str, out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = ReadCounter()
    results = []
    for case in json.loads(open(cases_file).read()):
        base = [*COMMON, *case["overrides"], f"model.init_from={case['folder']}"]
        expected = whole_load(base)
        for name, layout in LAYOUTS.items():
            cfg = load_config(None, [*base, *layout])
            validate(cfg, world)
            family, shape = get_family(cfg.model.family), ModelShape.of(cfg.model)
            mesh_layout = Layout.of(cfg.parallel, rank, world)
            parts = build_model_parts(family, cfg, shape, mesh_layout, build_mesh(mesh_layout, torch.device("cpu")),
                                      torch.device("cpu"))
            counter.bytes = 0
            source = initialise_from(family, cfg, shape, parts)
            read = counter.bytes
            found, _ = gathered_digests(parts)
            reads = [None] * world
            dist.all_gather_object(reads, read)
            results.append({"case": case["name"], "layout": name, "streamed": source.load_into is not None,
                            "names_match": sorted(found) == sorted(expected),
                            "differ": sorted(n for n in expected if found.get(n) != expected[n]),
                            "read_bytes": reads})
        results[-len(LAYOUTS)].update(stored_bytes(base))
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(results, handle, indent=1)


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    init_distributed(detect_launch(), "cpu", 60.0)
    if command == "same":
        same(*args)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
