"""`proseco plan CONFIG --world-size N --device-memory GB`: memory per rank and step time of a
layout, on paper, before any job is queued.

From the run config (its `model:`, `data:`, `train:`, `diffusion:` and `parallel:` sections) and
the world size: the layout (parallel/config.py's rules), each pipeline rank's memory at its peak
(memory.py: model state, gathered parameters, activations with and without checkpointing,
in-flight micro-batches, the ProSeCo step's passes, the loss), and the step time (timing.py: the
family's FLOP formula, the pipeline bubble, the analytic communication count at a link
bandwidth). A layout whose busiest rank does not fit the device is reported with what to change,
each alternative planned too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pretrain.config import RunConfig, grad_accum_steps, validate
from pretrain.errors import ConfigError
from pretrain.models import ModelShape, get_family
from pretrain.plan.families import FamilyPlan, family_plan
from pretrain.plan.memory import GIB, Layout, RankMemory, local_parameters, rank_memory
from pretrain.plan.timing import (
    Links,
    bubble_factor,
    collective_seconds,
    dp_payloads,
    flops_multiplier,
    pipeline_payload,
    tp_payloads,
)


@dataclass(frozen=True)
class Assumptions:
    """What the plan assumes of the machines (the CLI's flags; docs/scaling.md lists the defaults)."""

    device_memory_gb: float = 80.0
    """Memory of one device, GiB (as nvidia-smi reports it: an 80 GB H100 has 80 GiB)."""
    reserve_gb: float = 2.0
    """Of it, taken by the CUDA context, NCCL and cuBLAS workspaces and allocator fragmentation."""
    peak_tflops: float = 989.0
    """Dense bf16 peak of one device (H100 SXM: 989); fp32 runs use the same number."""
    mfu: float = 0.4
    """Share of the peak the step's kernels reach."""
    links: Links = field(default_factory=lambda: Links(intra_node=450.0, inter_node=50.0, devices_per_node=8))
    """Bandwidths per device (NVLink 4 one way; a 400 Gb/s NIC per GPU) and devices per node."""
    device: str = "cuda"
    """Where the run trains: cuda or cpu (on CPU dropout keeps its mask in the activation dtype)."""


@dataclass
class Plan:
    cfg: RunConfig
    layout: Layout
    model: FamilyPlan
    ranks: list[RankMemory]
    assumptions: Assumptions
    compute_s: float = 0.0
    bubble: float = 1.0
    tp_comm_s: float = 0.0
    dp_comm_s: float = 0.0
    pp_comm_s: float = 0.0
    flops_per_step: float = 0.0

    @property
    def busiest(self) -> RankMemory:
        return max(self.ranks, key=lambda rank: rank.total)

    @property
    def usable_bytes(self) -> float:
        return (self.assumptions.device_memory_gb - self.assumptions.reserve_gb) * GIB

    @property
    def fits(self) -> bool:
        return self.busiest.total <= self.usable_bytes

    @property
    def step_s(self) -> float:
        return self.compute_s * self.bubble + self.tp_comm_s + self.dp_comm_s + self.pp_comm_s

    @property
    def tokens_per_s(self) -> float:
        return self.cfg.data.global_batch_size * self.layout.seq_len / self.step_s

    def summary(self) -> dict:
        """The figures in numbers (bytes, seconds), for tests and tables."""
        rank = self.busiest
        return {"peak_bytes": rank.total, "state_bytes": rank.state,
                "activation_bytes": rank.activations + max(rank.loss, rank.transient), "loss_bytes": rank.loss,
                "transient_bytes": rank.transient, "reuse_gradients_bytes": rank.reuse_gradients,
                "reuse_at_peak_bytes": rank.reuse_at_peak, "fits": self.fits, "step_s": self.step_s,
                "pp_rank": rank.pp_rank,
                **{f"{name}_bytes": getattr(rank, name) for name in RankMemory.PARTS}}


def resolve_shape(cfg: RunConfig) -> RunConfig:
    """model.vocab_size and model.seq_len: as given, else from the shards' manifest (read only
    when one is missing), else a ConfigError naming both fixes."""
    m = cfg.model
    if m.vocab_size is not None and m.seq_len is not None:
        return cfg
    try:
        from pretrain.data import open_shards

        manifest, tokenizer = open_shards(cfg.data.shards)
    except Exception as err:  # any unreadable folder: the message says what to give instead
        raise ConfigError(f"proseco plan needs the vocabulary and sequence length: set model.vocab_size and "
                          f"model.seq_len (e.g. model.vocab_size=50258 model.seq_len=1024 for GPT-2 tokens), or "
                          f"point data.shards at a readable shard folder ({cfg.data.shards}: {err})") from None
    model = dataclasses.replace(m, vocab_size=m.vocab_size or tokenizer.vocab_size,
                                seq_len=m.seq_len or manifest.seq_len)
    return dataclasses.replace(cfg, model=model)


def make_layout(cfg: RunConfig, world_size: int, device: str) -> Layout:
    p, precision = cfg.parallel, cfg.train.precision
    act_bytes = 2 if precision == "bf16" else 4
    return Layout(world_size=world_size, dp=p.resolve_dp(world_size), tp=p.tp, pp=p.pp,
                  virtual_stages=p.pp_virtual_stages, layers_per_stage=tuple(p.layers_per_stage(cfg.model.num_layers)),
                  microbatches=grad_accum_steps(cfg, world_size), micro_batch_size=cfg.data.micro_batch_size,
                  seq_len=cfg.model.seq_len, data_parallel=p.data_parallel, schedule=p.pp_schedule,
                  sequence_parallel=p.sequence_parallel and p.tp > 1,
                  activation_checkpointing=p.activation_checkpointing,
                  param_bytes=2 if p.param_dtype == "bf16" else 4, act_bytes=act_bytes, autocast=precision == "bf16",
                  step_mode=cfg.train.step_mode, corrector=cfg.diffusion.corrector_training,
                  chunk_tokens=cfg.diffusion.loss_chunk_tokens, ema=cfg.optim.ema_decay > 0,
                  mask_bytes=act_bytes if device == "cpu" else 1)


def plan_config(cfg: RunConfig, world_size: int, assumptions: Assumptions | None = None) -> Plan:
    """The plan of `cfg` on `world_size` devices; a ConfigError when the layout is invalid."""
    assumptions = assumptions or Assumptions()
    cfg = resolve_shape(cfg)
    validate(cfg, world_size=world_size)
    if cfg.parallel.engine != "native":
        raise ConfigError("proseco plan covers parallel.engine=native (FSDP2/DDP, tp, pp); for DeepSpeed ZeRO plan "
                          "the same layout with parallel.data_parallel=fsdp (ZeRO-3) or ddp")
    layout = make_layout(cfg, world_size, assumptions.device)
    shape = ModelShape.of(cfg.model)
    model = family_plan(cfg.model, shape.vocab_size, cfg.train.precision)
    ranks = [rank_memory(model, layout, r) for r in range(layout.pp)]
    plan = Plan(cfg=cfg, layout=layout, model=model, ranks=ranks, assumptions=assumptions)
    _time(plan, shape)
    return plan


def _time(plan: Plan, shape: ModelShape) -> None:
    cfg, layout, a = plan.cfg, plan.layout, plan.assumptions
    forward = get_family(cfg.model.family).forward_flops(cfg.model, shape)
    plan.flops_per_step = forward * cfg.data.global_batch_size * flops_multiplier(layout)
    plan.compute_s = plan.flops_per_step / layout.world_size / (a.peak_tflops * 1e12 * a.mfu)
    plan.bubble = bubble_factor(layout)
    model, links = plan.model, a.links
    d, cond = model.d_model, getattr(cfg.model, "cond_dim", 0)
    slowest_tp = slowest_dp = 0.0
    last = layout.pp * layout.virtual_stages - 1
    for rank in plan.ranks:
        stages = layout.stages_of(rank.pp_rank)
        layers = sum(layout.layers_per_stage[s] for s in stages)
        tp = tp_payloads(cfg.model.family, layout, d, cond, layers, last in stages, 0 in stages)
        slowest_tp = max(slowest_tp, collective_seconds(tp, layout.tp, _bandwidth(layout.tp, links)))
        local, _, root = local_parameters(model, layout, rank.pp_rank)
        dp = dp_payloads(layout, layout.param_bytes * root, layout.param_bytes * (local - root))
        slowest_dp = max(slowest_dp, collective_seconds(dp, layout.dp, _bandwidth(layout.dp * layout.tp, links)))
    plan.tp_comm_s, plan.dp_comm_s = slowest_tp, slowest_dp
    crosses_nodes = layout.world_size > links.devices_per_node
    plan.pp_comm_s = pipeline_payload(layout, d) / ((links.inter_node if crosses_nodes else links.intra_node) * 1e9)


def _bandwidth(span: int, links: Links) -> float:
    """The link a group of ranks `span` apart-and-wide uses: NVLink within a node, else the NIC."""
    return links.intra_node if span <= links.devices_per_node else links.inter_node


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


__all__ = ["Assumptions", "Plan", "gib", "make_layout", "plan_config", "resolve_shape"]
