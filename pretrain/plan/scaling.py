"""docs/scaling.md: the OWT recipe and LLaDA-8B on 8 to 512 devices, on paper, from the plan's formulas.

    python -m pretrain.plan.scaling --out docs/scaling.md

For each world size every layout the config rules accept among tp in {1, 2, 4, 8}, pp in
{1, 2, 4, 8}, micro-batches of 1 to 32 sequences and activation checkpointing off/on is planned;
the table shows the fastest that fits, with the memory of its busiest rank, and the config as
written (where its batch splits over the world).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pretrain.config import RunConfig, load_config
from pretrain.errors import ConfigError
from pretrain.models.llada.config import LLADA_8B
from pretrain.plan import Assumptions, Plan, gib, plan_config

WORLD_SIZES = (8, 16, 32, 64, 128, 256, 512)
OWT = ("configs/owt-proseco.yaml", ["model.vocab_size=50258", "model.seq_len=1024"])
# LLaDA-8B's architecture as published; the batch (512 sequences of 4,096 tokens, 2 M tokens per
# step) is this table's assumption, with the schema's defaults (the OWT recipe's objective) and bf16.
LLADA = (None, [
    "model.family=llada", *(f"model.{k}={LLADA_8B[k]}" for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size")),
    f"model.vocab_size={LLADA_8B['vocab_size']}", "model.seq_len=4096", "data.global_batch_size=512",
    "train.precision=bf16", "parallel.data_parallel=fsdp", "parallel.param_dtype=bf16"])


def _variant(cfg: RunConfig, tp: int, pp: int, micro: int, checkpointed: bool) -> RunConfig:
    parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, dp=-1, activation_checkpointing=checkpointed)
    train = dataclasses.replace(cfg.train, step_mode="two_pass" if pp > 1 else cfg.train.step_mode)
    return dataclasses.replace(cfg, parallel=parallel, train=train,
                               data=dataclasses.replace(cfg.data, micro_batch_size=micro))


def best_plan(cfg: RunConfig, world: int, assumptions: Assumptions) -> tuple[Plan | None, int]:
    """The fastest layout that fits on `world` devices (None: none does), and how many were valid."""
    best, valid = None, 0
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8):
            for micro in (1, 2, 4, 8, 16, 32):
                for checkpointed in (False, True):
                    try:
                        plan = plan_config(_variant(cfg, tp, pp, micro, checkpointed), world, assumptions)
                    except ConfigError:
                        continue
                    valid += 1
                    if plan.fits and (best is None or _better(plan, best)):
                        best = plan
    return best, valid


def _better(plan: Plan, best: Plan) -> bool:
    """Faster by more than 1 %; within 1 %, the larger micro-batch (the formulas give kernels no
    gain from one, real GPUs do), then the fewer model-parallel ranks."""
    if abs(plan.step_s - best.step_s) > 0.01 * best.step_s:
        return plan.step_s < best.step_s
    return ((plan.layout.micro_batch_size, -plan.layout.tp * plan.layout.pp)
            > (best.layout.micro_batch_size, -best.layout.tp * best.layout.pp))


def _as_written(cfg: RunConfig, world: int, assumptions: Assumptions) -> str:
    """The config's own layout at this world size (its micro-batch capped to what the batch allows)."""
    micro = min(cfg.data.micro_batch_size, max(cfg.data.global_batch_size // world, 1))
    try:
        plan = plan_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch_size=micro)),
                           world, assumptions)
    except ConfigError as err:
        return f"invalid: {str(err).splitlines()[-1].strip(' -')}"
    return f"{gib(plan.busiest.total)} GiB, {'fits' if plan.fits else 'does not fit'}"


def _row(world: int, plan: Plan | None, valid: int, written: str) -> str:
    if plan is None:
        return f"| {world} | none of {valid} fits | | | | | | {written} |"
    layout, rank = plan.layout, plan.busiest
    return (f"| {world} | dp{layout.dp} x tp{layout.tp} x pp{layout.pp} | {layout.micro_batch_size} x "
            f"{layout.microbatches} | {'on' if layout.activation_checkpointing else 'off'} | {layout.step_mode} | "
            f"{gib(rank.total)} ({gib(rank.state)} state) | {plan.step_s:.3f} | {plan.tokens_per_s / 1e6:.2f} | "
            f"{written} |")


def table(name: str, source: tuple[str | None, list[str]], assumptions: Assumptions) -> list[str]:
    cfg = load_config(*source)
    one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch_size=1))
    first = plan_config(one, 8, assumptions)
    lines = [f"## {name}", "",
             f"{cfg.model.family}, {first.model.total_parameters:,} parameters, L = {cfg.model.seq_len:,}, global "
             f"batch {cfg.data.global_batch_size} sequences, train.precision={cfg.train.precision}, "
             f"parallel.data_parallel={cfg.parallel.data_parallel}, parallel.param_dtype={cfg.parallel.param_dtype}; "
             f"overrides: `{' '.join(source[1])}`", "",
             "| devices | fastest layout that fits | micro-batch x per rank | checkpointing | step mode | "
             "GiB per rank (of it state) | step s | M tokens/s | the config as written |",
             "|---|---|---|---|---|---|---|---|---|"]
    for world in WORLD_SIZES:
        plan, valid = best_plan(cfg, world, assumptions)
        lines.append(_row(world, plan, valid, _as_written(cfg, world, assumptions)))
    return lines + [""]


def render(assumptions: Assumptions) -> str:
    a = assumptions
    head = [
        "# Scaling on paper: the OWT recipe and LLaDA-8B on 8 to 512 devices", "",
        "Generated by `python -m pretrain.plan.scaling --out docs/scaling.md` from the formulas of `proseco plan`",
        "(pretrain/plan/), not measured on GPUs. Check one layout with, e.g.,",
        "`proseco plan configs/owt-proseco.yaml model.vocab_size=50258 model.seq_len=1024 --world-size 64 "
        "--device-memory 80`.", "",
        "Assumptions:", "",
        f"- device memory {a.device_memory_gb:g} GiB, of which {a.reserve_gb:g} GiB are kept for the CUDA context, "
        "NCCL and cuBLAS workspaces and allocator fragmentation;",
        "- bf16 autocast (train.precision=bf16), fp32 master weights, gradients, AdamW moments and EMA; dropout "
        "masks as CUDA's fused kernel keeps them (1 byte);",
        f"- peak {a.peak_tflops:g} TFLOP/s per device (H100 SXM dense bf16) at {a.mfu:g} of it (MFU), the FLOPs "
        "of the family's formula (3 units per sequence for MDLM, 6 for ProSeCo reuse, 7 for two_pass, +2 with "
        "activation checkpointing);",
        f"- links {a.links.intra_node:g} GB/s per device within a node of {a.links.devices_per_node} (NVLink) and "
        f"{a.links.inter_node:g} GB/s between nodes (a 400 Gb/s NIC per GPU); ring collectives; communication "
        "adds to compute (no overlap), so step times are upper bounds at the MFU given;",
        "- the collective payloads of benchmarks/comm_worker.py's analytic count (measured equal on CPU for the "
        "DiT, and for LLaDA's tensor-parallel terms by benchmarks/plan_comm_worker.py), the pipeline bubble "
        "of the schedule ((m + pp - 1) / m), and pipeline layouts run ProSeCo two_pass (required there).", "",
        "The search: tp in {1, 2, 4, 8}, pp in {1, 2, 4, 8} (1F1B), micro-batches 1 to 32, activation "
        "checkpointing off and on, every layout the config rules accept; the fastest that fits is shown. "
        "\"The config as written\" is the config's own layout, its micro-batch capped to what the batch allows.", "",
        "How far to trust it: on CPU the plan's peak is checked against the peak of torch's allocator over real "
        "training steps (`python -m benchmarks.plan_memory`; tests/test_plan.py requires agreement within 15 % "
        "on four small configs: DiT and LLaDA, reuse and two_pass, chunked and whole logits, with and "
        "without activation checkpointing, fp32 and bf16 autocast, and reuse with activation checkpointing "
        "and two micro-batches, where the y graph's gradients buffered through backward are a fifth of the "
        "peak; the slow tests check every rank of dp=2 under fsdp and ddp, two 1F1B stages and tp=2 the same "
        "way, dp=2 fsdp in reuse with activation checkpointing, whose buffered gradients are of the "
        "unsharded parameters, and dp=2 fsdp accumulating two micro-batches, whose unsharded fp32 gradients "
        "FSDP2 keeps until the last one's reduction: a term of every fsdp layout with several micro-batches "
        "per rank). Reuse layouts carry those buffered gradients (one per parameter both of the "
        "step's graphs use, unsharded under FSDP2, split over tp only): they fill as the y graph's "
        "activations are freed, so they add to the peak only where they exceed them (small micro-batches, "
        "activation checkpointing, little tp). Not measured: GPUs (CUDA kernels may "
        "keep other buffers than their CPU counterparts), the CUDA caching allocator's fragmentation (the "
        "reserve above), layouts beyond two ranks, and the transient of building the model before it is "
        "sharded. Step times ignore kernel efficiency's "
        "dependence on the micro-batch and any overlap of communication with compute.", "",
    ]
    body = table("OWT recipe (configs/owt-proseco.yaml, DiT 12 x 768)", OWT, assumptions)
    body += table("LLaDA-8B (GSAI-ML/LLaDA-8B architecture, ProSeCo objective)", LLADA, assumptions)
    return "\n".join(head + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown here (default: print it)")
    args = parser.parse_args()
    text = render(Assumptions())
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
