"""Peak activation memory of one ProSeCo step, the loss from chunks of tokens against whole logits.

At the OWT vocabulary (50,258 ids, padded to 50,304 rows as the framework pads them), L = 1,024
and a micro-batch of 2 in fp32, with the DiT of configs/owt-proseco.yaml (12 x 768, 12 heads,
cond 128; `--layers` for a shallower one), one training step (forward and backward) of ProSeCo
reuse and two-pass, with diffusion.loss_chunk_tokens at its default against 0 (whole logits, the
model returning B x L x V). Each variant runs in its own process on CPU, where torch keeps no
allocator statistics, so two exact measures are taken: the peak of the bytes torch's allocator
holds during the step above what it held before (model, gradients and batch already allocated;
every allocation and free recorded by torch.profiler's memory profiling, summed in time order:
what torch.cuda.max_memory_allocated would say on a GPU, free of the C allocator's
fragmentation that resident-memory figures include), and the bytes saved for backward (every
tensor autograd packs, storages counted once, via saved_tensors_hooks; a chunk's fused projection
and cross entropy keeps a view of the features, which the forward holds anyway, the head's
weight and bias, which are parameters, and one log-normaliser per token).

Reuse holds more than two_pass at the peak of backward here, by about the blocks' parameter
bytes: its corrector forward on y uses the same parameters as the z_t forward, in a second graph
that autograd backpropagates first, and a parameter's gradient is accumulated only once both
graphs have delivered theirs, so the y graph's part waits in a buffer meanwhile. With the
gradients already allocated (as here, and in every micro-batch after the first of a step) that
buffer is extra; without, it becomes the gradient. Under FSDP2 it is the unsharded gradient
(`proseco plan` counts it).

Both with the blocks' activations stored (the default) and with activation checkpointing of the
blocks (parallel.activation_checkpointing, rows ending in _ac): without it the blocks' saved
activations, which chunking does not touch, are most of the peak at 12 layers.

    python -m benchmarks.memory [--layers 12] [--seq-len 1024] [--batch 2] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from parallel.data_parallel import apply_activation_checkpointing
from parallel.runner import LocalRunner
from pretrain.config import DiffusionConfig
from pretrain.models import ModelShape
from pretrain.models.dit.config import DiTConfig
from pretrain.models.dit.model import DiT
from pretrain.step import Objective, forward_backward

OWT_VOCAB = 50_258  # GPT-2's 50,257 tokens and [MASK]
MULTIPLE = 64  # model.vocab_multiple's default
MODES = ("reuse", "two_pass")


def _peak_allocated(profiler: profile) -> int:
    """Highest running sum of the allocations (+) and frees (-) torch's allocator made while
    `profiler` recorded, in time order: the peak above the bytes held when it started."""
    events = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(mode: str, chunk: int, layers: int, seq_len: int, batch_size: int, checkpointed: bool) -> dict:
    """One training step of `mode` in this process: the peak of allocated bytes above the state
    before it, and the bytes saved for backward."""
    torch.manual_seed(0)
    rows = -(-OWT_VOCAB // MULTIPLE) * MULTIPLE
    model = DiT(DiTConfig(d_model=768, n_layers=layers, n_heads=12, cond_dim=128), ModelShape(rows, seq_len))
    if checkpointed:
        apply_activation_checkpointing(model.blocks.values())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # gradients are not activations: allocated before the baseline
    objective = Objective.build(DiffusionConfig(loss_chunk_tokens=chunk), mask_id=OWT_VOCAB - 1,
                                vocab_size=OWT_VOCAB, seed=0, global_batch_size=batch_size)
    generator = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, OWT_VOCAB - 1, (batch_size, seq_len), generator=generator),
             "position": torch.arange(batch_size), "valid": torch.ones(batch_size, dtype=torch.bool)}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward_backward(LocalRunner(model), [batch], objective, step=0, mode=mode,
                         backward_scale=1.0 / batch["tokens"].numel())
    return {"peak_bytes": _peak_allocated(profiler), "saved_bytes": sum(storages.values())}


def _run_variant(mode: str, chunk: int, checkpointed: bool, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory", "--worker", mode, str(chunk), "--layers", str(args.layers),
               "--seq-len", str(args.seq_len), "--batch", str(args.batch),
               *(["--activation-checkpointing"] if checkpointed else [])]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace | None = None) -> list[dict]:
    args = args or _parser().parse_args([])
    rows = []
    for checkpointed in (False, True):
        suffix = "_ac" if checkpointed else ""
        shape = (f"DiT {args.layers} x 768{', blocks checkpointed' if checkpointed else ''}, V = {OWT_VOCAB:,}, "
                 f"L = {args.seq_len:,}, micro-batch {args.batch}, fp32, chunks of {args.chunk} tokens")
        for mode in MODES:
            whole = _run_variant(mode, 0, checkpointed, args)
            chunked = _run_variant(mode, args.chunk, checkpointed, args)
            rows += [
                {"name": f"memory_peak_chunked_over_whole_{mode}{suffix}",
                 "value": round(chunked["peak_bytes"] / whole["peak_bytes"], 3), "unit": "ratio",
                 "what": f"peak memory allocated by torch in one {mode} step above the state before it, chunked "
                         f"loss / whole logits ({shape}); target <= 0.5"},
                {"name": f"memory_saved_chunked_over_whole_{mode}{suffix}",
                 "value": round(chunked["saved_bytes"] / whole["saved_bytes"], 3), "unit": "ratio",
                 "what": f"bytes saved for backward in one {mode} step, chunked loss / whole logits ({shape})"},
                {"name": f"memory_peak_whole_{mode}{suffix}", "value": round(whole["peak_bytes"] / 2**20),
                 "unit": "MiB", "what": f"peak memory allocated by torch in one {mode} step with whole logits, "
                                        f"above the state before it ({shape})"},
                {"name": f"memory_peak_chunked_{mode}{suffix}", "value": round(chunked["peak_bytes"] / 2**20),
                 "unit": "MiB", "what": f"the same with the chunked loss ({shape})"},
            ]
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=DiffusionConfig().loss_chunk_tokens)
    parser.add_argument("--activation-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "CHUNK"), help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.worker:
        mode, chunk = args.worker
        print(json.dumps(measure(mode, int(chunk), args.layers, args.seq_len, args.batch,
                                 args.activation_checkpointing)))
        return
    for row in run(args):
        print(f"{row['name']} = {row['value']} {row['unit']}  ({row['what']})")


if __name__ == "__main__":
    main()
