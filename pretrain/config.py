"""Typed run configuration: dataclasses per section, YAML files, dotted overrides, validation.

A run is described by one `RunConfig`. It is read from a YAML file whose top-level keys are the
sections below, then patched by command-line overrides such as `model.n_layers=4`. Every field
has a docstring (the string literal under it); `proseco config docs` turns them into
docs/config.md. Everything that can be checked without starting a process group is checked by
`validate()`, which reports every problem at once, each naming the field and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tokenizer.errors import UserError


class ConfigError(UserError):
    """A configuration problem found before training starts; the message names field and fix."""


@dataclass
class ModelConfig:
    """The DiT backbone (MDLM/ProSeCo layout: adaLN-Zero blocks, rotary attention)."""

    d_model: int = 256
    """Width of the residual stream (768 in the paper's OWT model)."""
    n_layers: int = 4
    """Number of transformer blocks (12 in the paper's OWT model)."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by it (head size 64 in the paper)."""
    cond_dim: int = 128
    """Width of the conditioning vector that drives the adaLN modulation."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of d_model."""
    dropout: float = 0.0
    """Residual dropout on the attention and MLP branches (0.1 in the paper's runs)."""
    time_conditioning: bool = False
    """Feed the noise level to the network. Off in every ProSeCo run: sigma is zeroed."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding."""
    attention: Literal["auto", "sdpa", "flash"] = "auto"
    """Attention kernel: flash-attn when importable and on CUDA (auto), else PyTorch SDPA."""
    vocab_size: int | None = None
    """Real vocabulary including the mask token; None takes it from the shards' tokenizer."""
    vocab_multiple: int = 64
    """Embedding and output rows are padded to a multiple of this (the same on every layout, so
    checkpoints reshard; tensor parallelism splits them evenly). Padding rows are never predicted."""
    seq_len: int | None = None
    """Sequence length; None takes it from the shards' manifest."""


@dataclass
class DiffusionConfig:
    """Noise schedule and the ProSeCo objective, switch for switch with the official code."""

    noise_schedule: Literal["loglinear", "linear", "cosine", "geometric"] = "loglinear"
    """sigma(t): loglinear (every ProSeCo run; loss weight exactly 1/t), linear, cosine, geometric."""
    schedule_eps: float = 1e-3
    """eps of the loglinear and cosine schedules: alpha_1 = eps, so no sequence is fully masked."""
    sigma_min: float = 1e-4
    """Smallest sigma of the linear and geometric schedules (ignored by loglinear, as upstream)."""
    sigma_max: float = 20.0
    """Largest sigma of the linear and geometric schedules (ignored by loglinear, as upstream)."""
    antithetic_sampling: bool = True
    """Stratify t over the global batch: sample i draws t from the i-th of B equal strata."""
    sampling_eps_training: float = 0.1
    """Lower bound of t in training (the released runs use 0.1: t ~ U[0.1, 1], weight <= 10)."""
    sampling_eps_validation: float = 1e-3
    """Lower bound of t in validation (t ~ U[1e-3, 1]), as the official code."""
    corrector_training: bool = True
    """Train the model to correct its own argmax reconstructions (ProSeCo). False: plain MDLM."""
    corrector_input: Literal["all", "masked"] = "all"
    """all: the corrector sees the model's output at every position (released runs);
    masked: model output at masked positions, clean tokens elsewhere."""
    corrector_prior: Literal["argmax", "sample"] = "argmax"
    """How the corrector input is drawn from the first pass: argmax (paper) or a categorical sample."""
    weighted_corrector_loss: bool = True
    """Weight the corrector loss by the MDLM weight dsigma/expm1(sigma) (= 1/t), as the paper."""
    corrector_errors_upweighted: bool = True
    """Released OWT run's variant: log-loss where the corrector input is wrong, -p where right."""
    mdlm_loss_weight: float = 1.0
    """Scalar on the MDLM loss (the official config defaults to 0; the released runs use 1)."""
    corrector_loss_weight: float = 1.0
    """Scalar on the corrector loss (the official config defaults to 0; the released runs use 1)."""
    corrector_training_start_step: int = 0
    """Train plain MDLM before this optimizer step, then the joint loss (0 or -1: from the start)."""


@dataclass
class DataConfig:
    """Token shards and how they are streamed."""

    shards: str = "data/shakespeare/shards"
    """Folder written by `proseco tokenizer shard` (manifest.json, train/ and val/ shards)."""
    global_batch_size: int = 32
    """Sequences per optimizer step, summed over data-parallel ranks and accumulation steps."""
    micro_batch_size: int = 32
    """Sequences per forward pass on one data-parallel rank."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 reads in the training process)."""
    shuffle: bool = True
    """Shuffle shard order and rotate within shards each epoch (seeded; exact on resume)."""
    max_corrupt_fraction: float = 0.01
    """Fail when more than this fraction of samples in a shard, or of shards, is unreadable."""


@dataclass
class OptimConfig:
    """AdamW, learning-rate schedule, clipping and EMA (defaults: the paper's OWT run)."""

    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 2500
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant (OWT run) or cosine decay to min_lr_ratio * lr at train.max_steps."""
    min_lr_ratio: float = 0.01
    """Floor of the cosine schedule as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    ema_decay: float = 0.9999
    """EMA of the weights, with warm-up min(decay, (1+n)/(10+n)); 0 disables. Evaluation and
    sampling use the EMA weights."""


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    seed: int = 1
    """Seeds initialisation, masking, noise levels and data order."""
    step_mode: Literal["two_pass", "reuse"] = "reuse"
    """two_pass: a no-grad forward builds the corrector input, then one forward of both halves;
    reuse: the graded forward of z_t also gives the argmax (the official code's cost)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the blocks (weights and LayerNorm stay fp32). fp32 is exact and is the
    default on CPU, where bf16 backward is about five times slower."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks CUDA when available."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/Inf loss or gradient never reaches the weights: stop the run, or skip the step."""
    max_skipped_steps: int = 10
    """With on_nonfinite=skip, stop after this many consecutive skipped steps."""
    eval_every: int = 200
    """Validate every this many steps (0: only at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation (0: the whole validation split)."""


@dataclass
class ParallelConfig:
    """Layout of the device mesh and how each dimension is applied."""

    dp: int = -1
    """Data-parallel size; -1 infers it as world_size / (tp * pp)."""
    tp: int = 1
    """Tensor-parallel size (attention heads and the vocabulary are split)."""
    pp: int = 1
    """Pipeline-parallel stages."""
    sequence_parallel: bool = False
    """With tp > 1, shard norms and dropouts along the sequence."""
    data_parallel: Literal["fsdp", "fsdp_no_reshard", "ddp"] = "fsdp"
    """fsdp: full sharding (ZeRO-3); fsdp_no_reshard: keep parameters after forward (ZeRO-2-like);
    ddp: replicated parameters."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    """Pipeline schedule."""
    pp_virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved_1f1b needs at least 2)."""
    pp_layers_per_stage: list[int] | None = None
    """Blocks per stage (its length is pp * pp_virtual_stages); None balances automatically."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP parameter dtype during compute; gradients are always reduced in fp32."""
    timeout_s: float = 600.0
    """Collective timeout: a dead or stuck rank ends the job with an error after this long."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (DCP), atomic and reshardable."""

    every: int = 500
    """Save every this many steps (0: only at the end and on preemption)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints."""
    keep_every: int = 0
    """Also keep, permanently, the checkpoints of steps that are multiples of this (0: none), e.g.
    for comparisons at equal training FLOPs or for annealing from a mid-run state."""
    resume: str = "auto"
    """auto: continue from the latest complete checkpoint in the run folder, if any;
    none: start fresh (fails if the run folder holds checkpoints); or a checkpoint path."""
    async_save: bool = False
    """Write checkpoints in the background while training continues."""


@dataclass
class LoggingConfig:
    """Where and how a run reports."""

    run_dir: str = "runs/default"
    """Run folder: resolved config, metrics.jsonl, checkpoints/, plots, samples."""
    log_every: int = 10
    """Write training metrics every this many steps."""
    progress: bool = True
    """Rank-0 progress bar with loss, tokens/s and ETA."""
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    """Weights & Biases mode (offline and disabled need no network)."""
    wandb_project: str = "proseco-pretrain"
    """Weights & Biases project."""


@dataclass
class SamplingConfig:
    """The ProSeCo sampler (MDLM ancestral sampling with corrector loops)."""

    steps: int = 64
    """Unmasking steps T."""
    num_samples: int = 16
    """Samples drawn at the end of training and by `proseco sample` by default."""
    batch_size: int = 16
    """Samples generated at once."""
    nucleus_p: float = 1.0
    """Top-p applied to every distribution the sampler draws from (1.0 disables)."""
    float64: bool = True
    """Sample from float64 probabilities (avoids the low-precision Gumbel bias)."""
    use_cache: bool = True
    """Reuse the last forward when the input did not change (no NFE spent)."""
    corrector_steps: int = 0
    """Corrector iterations per loop S (0: plain MDLM sampling)."""
    corrector_every: int = 1
    """Run a corrector loop after every this many unmasking steps (omega)."""
    corrector_start_iter: int = 0
    """Run corrector loops only from this unmasking step on."""
    corrector_sampling: Literal["argmax", "sample", "select_top_k"] = "argmax"
    """How each corrector iteration updates the sequence."""
    corrector_top_k: int = 0
    """With select_top_k: change at most this many positions per iteration."""
    corrector_prior: Literal["argmax", "sample"] = "argmax"
    """Initial corrector input: argmax of the denoiser, or a sample from it."""
    denoise_final: bool = False
    """Fill masks left after the last step with the argmax (off, as the official sampler)."""
    block_length: int | None = None
    """Semi-autoregressive blocks of this length with low-confidence unmasking (None: off)."""
    temperature: float = 0.0
    """Block mode: 0 unmasks the argmax (greedy, as LLaDA's harness), > 0 samples at this temperature."""
    seed: int = 0
    """Seed of the sampler's random draws."""


@dataclass
class RunConfig:
    """A whole run. YAML top-level keys are these sections."""

    name: str = "default"
    """Run name (used by logging backends)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


# ---------------------------------------------------------------------------------------------
# Reading: YAML + dotted overrides -> typed dataclasses


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config (or start from the defaults), apply `a.b=value` overrides, check types.

    Raises ConfigError naming the field for unknown keys, malformed overrides and wrong types.
    Cross-field checks are in `validate()`.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/shakespeare.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    return _build(RunConfig, raw, prefix="")


def split_config_args(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`proseco train a.b=1 c.d=2` names no file: the first 'argument' is then an override."""
    if config is not None and "=" in config and not Path(config).exists():
        return None, [config, *overrides]
    return config, list(overrides)


def load_config_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                     drop_unknown: bool = False) -> RunConfig:
    """A RunConfig from an already parsed mapping (e.g. the config saved in a checkpoint).

    drop_unknown: ignore (with a warning) fields this version does not know, so that a checkpoint
    saved by an older version, whose config had fields since removed, still loads.
    """
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy overrides can change
    if drop_unknown:
        _drop_unknown(RunConfig, raw, prefix="")
    for override in overrides:
        _apply_override(raw, override)
    return _build(RunConfig, raw, prefix="")


def _drop_unknown(cls: type, raw: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for key in list(raw):
        if key not in hints:
            warnings.warn(f"ignoring config field {prefix}{key}, unknown to this version")
            del raw[key]
        elif dataclasses.is_dataclass(hints[key]) and isinstance(raw[key], dict):
            _drop_unknown(hints[key], raw[key], prefix=f"{prefix}{key}.")


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{override}' is not of the form section.field=value, e.g. model.n_layers=4")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': {part} is a value, not a section")
        node = child
    # YAML parsing gives the same types as in a file: 4 -> int, 1e-3 -> float, true -> bool, [1,2] -> list
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known fields: {', '.join(names)}"
            raise ConfigError(f"unknown config field {prefix}{key}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """Check `value` against the annotation `kind`; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        for option in others:
            try:
                return _coerce(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name} must be {_describe(kind)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list ({_describe(kind)}), got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{name} must have {len(args)} entries, got {len(value)}")
            return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {kind!r} for {name}")  # a bug in this file


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_describe(a) for a in args)}]"
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))


# ---------------------------------------------------------------------------------------------
# Cross-field validation, before any process group exists


def padded_vocab_size(cfg: ModelConfig, vocab_size: int) -> int:
    """Rows of the embedding and output layer: vocab_size rounded up to model.vocab_multiple."""
    return -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple


def resolve_dp(cfg: RunConfig, world_size: int) -> int:
    """Data-parallel size for a world of `world_size` processes (after `validate`)."""
    p = cfg.parallel
    return p.dp if p.dp > 0 else world_size // (p.tp * p.pp)


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step."""
    return cfg.data.global_batch_size // (resolve_dp(cfg, world_size) * cfg.data.micro_batch_size)


def validate(cfg: RunConfig, world_size: int = 1) -> None:
    """Every check that needs no process group; raises one ConfigError listing all problems."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    m, d, data, o, t, p, c = cfg.model, cfg.diffusion, cfg.data, cfg.optim, cfg.train, cfg.parallel, cfg.checkpoint
    for name in ("d_model", "n_layers", "n_heads", "cond_dim", "mlp_ratio"):
        need(getattr(m, name) > 0, f"model.{name} must be positive")
    need(m.n_heads <= 0 or m.d_model % m.n_heads == 0,
         f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; pick n_heads dividing d_model")
    need(m.n_heads <= 0 or (m.d_model // m.n_heads) % 2 == 0,
         "model.d_model / model.n_heads must be even for rotary embeddings; change n_heads or d_model")
    need(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    need(m.vocab_size is None or m.vocab_size > 1, "model.vocab_size must be at least 2 (or null: from the tokenizer)")
    need(m.vocab_multiple >= 1, "model.vocab_multiple must be >= 1")
    need(p.tp < 1 or m.vocab_multiple % p.tp == 0,
         f"model.vocab_multiple={m.vocab_multiple} is not divisible by parallel.tp={p.tp}; make it a multiple of tp "
         "so the padded vocabulary splits evenly")
    need(m.seq_len is None or m.seq_len > 0, "model.seq_len must be positive (or null: from the shards)")

    need(0.0 < d.schedule_eps < 1.0, f"diffusion.schedule_eps={d.schedule_eps} must be in (0, 1)")
    need(0.0 < d.sigma_min < d.sigma_max, "diffusion.sigma_min must be positive and below diffusion.sigma_max")
    for name in ("sampling_eps_training", "sampling_eps_validation"):
        need(0.0 <= getattr(d, name) < 1.0, f"diffusion.{name} must be in [0, 1)")
    need(d.mdlm_loss_weight >= 0 and d.corrector_loss_weight >= 0, "diffusion loss weights must be >= 0")
    need(d.mdlm_loss_weight > 0 or (d.corrector_training and d.corrector_loss_weight > 0),
         "diffusion.mdlm_loss_weight and diffusion.corrector_loss_weight give a zero loss "
         "(the official config's defaults); set them to 1.0 as the released runs do")

    for name in ("tp", "pp", "pp_virtual_stages"):
        need(getattr(p, name) >= 1, f"parallel.{name} must be >= 1")
    need(p.dp == -1 or p.dp >= 1, "parallel.dp must be -1 (infer from the world size) or >= 1")
    need(p.timeout_s > 0, "parallel.timeout_s must be positive")
    model_parallel = max(p.tp, 1) * max(p.pp, 1)
    if world_size % model_parallel:
        problems.append(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {model_parallel}; "
                        "launch a multiple of tp * pp processes")
    dp = p.dp if p.dp > 0 else max(world_size // model_parallel, 1)
    if p.dp > 0 and p.dp * model_parallel != world_size:
        problems.append(f"parallel.dp * tp * pp = {p.dp * model_parallel} but {world_size} processes were launched; "
                        "set parallel.dp=-1 to infer it or launch that many")
    if p.tp > 1:
        need(m.n_heads % p.tp == 0, f"model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}; "
             "choose tp dividing the number of heads")
        need((m.mlp_ratio * m.d_model) % p.tp == 0, f"the MLP width {m.mlp_ratio * m.d_model} is not divisible by "
             f"parallel.tp={p.tp}")
        need((6 * m.d_model) % p.tp == 0, "the adaLN modulation width 6 * model.d_model is not divisible by parallel.tp")
    stages = p.pp * p.pp_virtual_stages
    if p.pp_layers_per_stage is not None:
        need(len(p.pp_layers_per_stage) == stages,
             f"parallel.pp_layers_per_stage has {len(p.pp_layers_per_stage)} entries; it needs pp * pp_virtual_stages "
             f"= {stages}")
        need(sum(p.pp_layers_per_stage) == m.n_layers and min(p.pp_layers_per_stage, default=0) >= 1,
             f"parallel.pp_layers_per_stage must be positive and sum to model.n_layers={m.n_layers}")
    else:
        need(p.pp == 1 or m.n_layers % stages == 0,
             f"model.n_layers={m.n_layers} is not divisible by pp * pp_virtual_stages = {stages}; "
             "change n_layers or give parallel.pp_layers_per_stage")
    need(p.pp_schedule != "interleaved_1f1b" or p.pp == 1 or p.pp_virtual_stages >= 2,
         "parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2")
    need(p.pp_virtual_stages == 1 or p.pp_schedule == "interleaved_1f1b",
         "parallel.pp_virtual_stages > 1 needs parallel.pp_schedule=interleaved_1f1b")
    need(p.pp == 1 or t.step_mode == "two_pass",
         "train.step_mode=reuse needs the whole model in one stage; with parallel.pp > 1 use train.step_mode=two_pass")

    need(data.micro_batch_size >= 1, "data.micro_batch_size must be >= 1")
    need(data.num_workers >= 0, "data.num_workers must be >= 0")
    need(0.0 <= data.max_corrupt_fraction < 1.0, "data.max_corrupt_fraction must be in [0, 1)")
    per_step = dp * data.micro_batch_size
    if data.micro_batch_size >= 1 and data.global_batch_size % per_step:
        problems.append(f"data.global_batch_size={data.global_batch_size} is not divisible by dp x micro_batch_size = "
                        f"{dp} x {data.micro_batch_size}; make it a multiple of {per_step}")
    if p.pp > 1 and data.micro_batch_size >= 1 and data.global_batch_size % per_step == 0:
        accum = data.global_batch_size // per_step
        need(accum >= p.pp, f"with parallel.pp={p.pp} each rank needs at least pp micro-batches per step, it has "
             f"{accum}; raise data.global_batch_size or lower data.micro_batch_size")
        need(p.pp_schedule != "interleaved_1f1b" or accum % p.pp == 0,
             f"parallel.pp_schedule=interleaved_1f1b needs the micro-batches per step ({accum}) to be a multiple of "
             f"parallel.pp={p.pp}; change data.global_batch_size or data.micro_batch_size")

    need(o.lr > 0, "optim.lr must be positive")
    need(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    need(0.0 <= o.ema_decay < 1.0, "optim.ema_decay must be in [0, 1)")
    need(o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
    need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
    need(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas must be in [0, 1)")

    need(t.max_steps >= 1, "train.max_steps must be >= 1")
    need(t.eval_every >= 0 and t.eval_batches >= 0, "train.eval_every and train.eval_batches must be >= 0")
    need(c.every >= 0 and c.keep_last >= 1, "checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    need(c.keep_every >= 0, "checkpoint.keep_every must be >= 0 (0: keep only the last checkpoint.keep_last)")

    s = cfg.sampling
    need(s.steps >= 1, "sampling.steps must be >= 1")
    need(0.0 < s.nucleus_p <= 1.0, "sampling.nucleus_p must be in (0, 1]")
    need(s.corrector_steps >= 0 and s.corrector_every >= 1, "sampling.corrector_steps must be >= 0 and "
         "sampling.corrector_every >= 1")
    need(s.corrector_sampling != "select_top_k" or s.corrector_top_k > 0,
         "sampling.corrector_sampling=select_top_k needs sampling.corrector_top_k > 0")
    need(s.block_length is None or s.block_length >= 1, "sampling.block_length must be >= 1 or null")
    need(s.temperature >= 0, "sampling.temperature must be >= 0")
    need(s.batch_size >= 1 and s.num_samples >= 1, "sampling.batch_size and sampling.num_samples must be >= 1")

    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------------
# Writing and documenting


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), ready for YAML or JSON."""
    return yaml.safe_load(yaml.safe_dump(_plain(cfg)))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config atomically (every run keeps the config it ran with)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass, read from the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference_markdown() -> str:
    """docs/config.md: every section and field with its type, default and docstring."""
    lines = ["# Configuration reference", "",
             "Generated by `proseco config docs` from the dataclasses in `pretrain/config.py`.",
             "Set fields in a YAML file under their section, or override on the command line:",
             "`proseco train configs/shakespeare.yaml model.n_layers=8 optim.lr=1e-3`.", ""]
    root_hints = typing.get_type_hints(RunConfig)
    top_docs = field_docs(RunConfig)
    lines += ["## Top level", "", "| field | type | default | meaning |", "|---|---|---|---|"]
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        if not dataclasses.is_dataclass(root_hints[f.name]):
            lines.append(f"| `{f.name}` | {_describe(root_hints[f.name])} | `{getattr(defaults, f.name)!r}` | "
                         f"{top_docs.get(f.name, '')} |")
    for f in dataclasses.fields(RunConfig):
        section = root_hints[f.name]
        if not dataclasses.is_dataclass(section):
            continue
        docs, hints, default = field_docs(section), typing.get_type_hints(section), section()
        lines += ["", f"## `{f.name}`", "", inspect.getdoc(section) or "", "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        for sf in dataclasses.fields(section):
            value = _plain(getattr(default, sf.name))
            lines.append(f"| `{sf.name}` | {_describe(hints[sf.name]).replace('|', '/')} | `{value!r}` | "
                         f"{docs.get(sf.name, '')} |")
    return "\n".join(lines) + "\n"
