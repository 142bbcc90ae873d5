"""The plan as text, and what to change when it does not fit: each alternative is planned too."""

from __future__ import annotations

import dataclasses

from pretrain.config import RunConfig
from pretrain.errors import ConfigError
from pretrain.plan import Assumptions, Plan, gib, plan_config


def describe(plan: Plan) -> str:
    """Memory of the busiest rank by part, both activation variants, and the step time."""
    layout, rank, a = plan.layout, plan.busiest, plan.assumptions
    ac = "on" if layout.activation_checkpointing else "off"
    lines = [
        f"layout: dp={layout.dp} ({layout.data_parallel}) x tp={layout.tp}"
        f"{' (sequence parallel)' if layout.sequence_parallel else ''} x pp={layout.pp}"
        f"{f' ({layout.schedule}, {layout.virtual_stages} chunks per rank)' if layout.pp > 1 else ''} "
        f"= {layout.world_size} devices; {layout.microbatches} micro-batches of {layout.micro_batch_size} x "
        f"{layout.seq_len} tokens per rank; step mode {layout.step_mode if layout.corrector else 'mdlm'}; "
        f"activation checkpointing {ac}; train.precision={'bf16' if layout.autocast else 'fp32'}",
        f"model: {plan.cfg.model.family}, {plan.model.total_parameters:,} parameters, {plan.model.vocab_rows:,} "
        f"vocabulary rows",
        f"memory per rank (GiB), pipeline rank {rank.pp_rank} (the busiest of {layout.pp}), "
        f"{rank.in_flight} micro-batch(es) in flight:",
    ]
    rows = [("parameters (fp32 master)", rank.parameters), ("gradients (fp32)", rank.gradients),
            ("AdamW moments (2 x fp32)", rank.optimizer), ("EMA (fp32)", rank.ema),
            ("gathered parameters (FSDP units)", rank.gathered),
            ("unsharded gradients (accumulation)", rank.accumulated_gradients),
            ("autocast bf16 weight copies", rank.weight_casts),
            ("activations kept for backward", rank.activations),
            ("reuse: y-graph gradients buffered", rank.reuse_gradients),
            ("  adding to the peak (y graph freed)", rank.reuse_at_peak), ("loss at its backward", rank.loss),
            ("a block's backward", rank.transient)]
    lines += [f"  {name:<40}{gib(value):>10}" for name, value in rows]
    lines.append(f"  {'peak (held + reuse + larger of last 2)':<40}{gib(rank.total):>10}   of "
                 f"{a.device_memory_gb - a.reserve_gb:.1f} usable ({a.device_memory_gb:g} - {a.reserve_gb:g} reserved)")
    lines.append(f"  activations at their peak: {gib(rank.activations_stored)} without checkpointing, "
                 f"{gib(rank.activations_checkpointed)} with")
    lines.append(f"step time: {plan.step_s:.3f} s = compute {plan.compute_s:.3f} s x pipeline bubble "
                 f"{plan.bubble:.2f} + tp {plan.tp_comm_s:.3f} s + dp {plan.dp_comm_s:.3f} s + pp "
                 f"{plan.pp_comm_s:.3f} s "
                 f"communication ({plan.flops_per_step:.3g} FLOPs per step at {a.mfu:g} x {a.peak_tflops:g} TFLOP/s; "
                 f"links {a.links.intra_node:g} GB/s in a node of {a.links.devices_per_node}, "
                 f"{a.links.inter_node:g} GB/s between nodes; no overlap); {plan.tokens_per_s:,.0f} tokens/s")
    return "\n".join(lines)


def _candidates(cfg: RunConfig, world_size: int) -> list[tuple[str, RunConfig]]:
    """Changes that lower the busiest rank's memory, each as the override a user would give."""
    p, data = cfg.parallel, cfg.data
    out = []

    def change(text: str, **parallel) -> None:
        out.append((text, dataclasses.replace(cfg, parallel=dataclasses.replace(p, **parallel))))

    if not p.activation_checkpointing:
        change("parallel.activation_checkpointing=true", activation_checkpointing=True)
    if cfg.train.step_mode == "reuse" and cfg.diffusion.corrector_training:
        # One graph: no y-graph gradients buffered through backward (one extra forward of work).
        out.append(("train.step_mode=two_pass",
                    dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, step_mode="two_pass"))))
    if p.data_parallel != "fsdp" and p.resolve_dp(world_size) > 1:
        change("parallel.data_parallel=fsdp", data_parallel="fsdp")
    for factor in (2, 4, 8):
        change(f"parallel.tp={p.tp * factor}", tp=p.tp * factor, dp=-1)
    for factor in (2, 4):
        two_pass = dataclasses.replace(cfg.train, step_mode="two_pass")
        staged = dataclasses.replace(cfg, train=two_pass, parallel=dataclasses.replace(p, pp=p.pp * factor, dp=-1))
        out.append((f"parallel.pp={p.pp * factor}" + (" train.step_mode=two_pass" if cfg.train.step_mode != "two_pass"
                                                     else ""), staged))
    micro = data.micro_batch_size // 2
    while micro >= 1:
        out.append((f"data.micro_batch_size={micro}",
                    dataclasses.replace(cfg, data=dataclasses.replace(data, micro_batch_size=micro))))
        micro //= 2
    return out


def alternatives(plan: Plan, world_size: int, assumptions: Assumptions) -> list[str]:
    """For a plan that does not fit: each valid change with the busiest rank's memory it gives."""
    lines = []
    for text, cfg in _candidates(plan.cfg, world_size):
        try:
            other = plan_config(cfg, world_size, assumptions)
        except ConfigError:
            continue  # a layout the config rules refuse (heads not divisible by tp, ...)
        verdict = "fits" if other.fits else "still too large"
        lines.append(f"  {text:<56} {gib(other.busiest.total):>8} GiB per rank: {verdict}, step {other.step_s:.3f} s")
    return lines
