"""Model families: each subpackage of pretrain/models is one family, found by its name.

A family brings, beside its plain `nn.Module`:
- `config.py`: `CONFIG`, the dataclass of the run config's `model:` section (a `ModelConfig`),
  importable without torch so that reading and checking a config stays cheap;
- `family.py`: `FAMILY`, a `ModelFamily` naming its builder, its parallelize plan (tensor
  parallel styles per module, activation checkpointing, FSDP units), its pipeline stage builder,
  the layout checks only it can make, its FLOP formula and its checkpoint-name mapping.

Adding a family adds a folder here; neither parallel/ nor the training loop changes.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_FAMILY = "dit"

# Sizes beyond any machine, not just this one (running out of memory is found out by training):
# 10**13 parameters need 160 TB for fp32 weights, gradients and AdamW moments, about ten times the
# largest models trained so far; 10**13 activations of one sequence (the block inputs a backward
# needs even with activation checkpointing) are 20 TB in bf16, some 35 times those of a
# 405B-parameter model at 128k context. Under both caps every size product stays far below 2**63,
# so no tensor size overflows torch's int64.
MAX_PARAMETERS = 10**13
MAX_SEQUENCE_ACTIVATIONS = 10**13


def head_problems(d_model: int, n_heads: int) -> list[str]:
    """Attention heads that split model.d_model evenly into the even head sizes rotary needs."""
    if n_heads <= 0:
        return []
    if d_model % n_heads:
        return [f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}; pick n_heads dividing "
                "d_model"]
    if (d_model // n_heads) % 2:
        return ["model.d_model / model.n_heads must be even for rotary embeddings; change n_heads or d_model"]
    return []


def size_problems(parameters: int, activations: int, seq_len: int | None, size_fields: str) -> list[str]:
    """Sizes beyond any machine (MAX_PARAMETERS, MAX_SEQUENCE_ACTIVATIONS); `size_fields` names the
    family's fields that set the parameter count, for the fix."""
    found = []
    if parameters > MAX_PARAMETERS:
        found.append(f"model has {_about(parameters)} parameters, beyond any machine (at most {MAX_PARAMETERS:.0e}); "
                     f"lower {size_fields}")
    if activations > MAX_SEQUENCE_ACTIVATIONS:
        found.append(f"one sequence of model.seq_len={seq_len} keeps {_about(activations)} activations, beyond any "
                     f"machine (at most {MAX_SEQUENCE_ACTIVATIONS:.0e}); lower model.seq_len, model.n_layers or "
                     "model.d_model")
    return found


def _about(count: int) -> str:
    """A positive count to three digits, however large (as a float, one past 1e308 would overflow)."""
    exponent = int(math.log10(count))
    return f"{count / 10**exponent:.2f}e{exponent}"


def keep_stage_blocks(model, stage: int, counts: list[int]):
    """`model` (a model whose blocks sit in a ModuleDict `blocks` keyed "0".."n-1", usually just
    built on the meta device) with only the blocks of pipeline stage `stage` of len(counts)
    stages left, in place; parameter names are unchanged. The family's build_stage then drops
    what only the first or last stage owns."""
    first = sum(counts[:stage])
    keep = {str(i) for i in range(first, first + counts[stage])}
    for name in list(model.blocks.keys()):
        if name not in keep:
            del model.blocks[name]
    return model


@dataclass
class ModelConfig:
    """What every model family's `model:` section has: the family and the sizes fixed by data.
    A family's subclass adds its own fields and a `num_layers` property (the blocks a pipeline
    splits into stages)."""

    family: str = DEFAULT_FAMILY
    """Model family: a subpackage of pretrain/models (dit, llada)."""
    vocab_size: int | None = field(default=None, metadata={"ge": 2})
    """Real vocabulary including the mask token; None takes it from the shards' tokenizer."""
    vocab_multiple: int = field(default=64, metadata={"ge": 1})
    """Embedding and output rows are padded to a multiple of this (the same on every layout, so
    checkpoints reshard; tensor parallelism splits them evenly). Padding rows are never predicted."""
    seq_len: int | None = field(default=None, metadata={"ge": 1})
    """Sequence length; None takes it from the shards' manifest."""
    init_from: str | None = None
    """Start a new run from these weights (fresh optimizer, data position and step): a
    checkpoint or run folder, a consolidated .safetensors file, or a Hugging Face folder in either
    layout (`proseco convert`). Their shapes are checked against this config before training
    starts; a run that resumes from its own checkpoint ignores it."""
    init_from_ema: bool = True
    """With model.init_from a checkpoint or consolidated file: take its EMA weights (false: the raw
    ones). A Hugging Face folder holds one set of weights."""

    def min_vocab_rows(self) -> int:
        """Embedding and output rows: vocab_size rounded up to vocab_multiple (while vocab_size is
        None, the fewest a vocabulary of the mask and one token can have)."""
        multiple = max(self.vocab_multiple, 1)
        return -(-(self.vocab_size or 2) // multiple) * multiple

    def problems(self) -> list[str]:
        """The family's checks beyond each field's declared range (pretrain.config checks those),
        e.g. sizes beyond MAX_PARAMETERS; each names the field and the fix."""
        return []

    def kernel_problems(self, device: str, precision: str) -> list[str]:
        """What the family's kernels need of the machine the run starts on: the device it resolves
        to ('cpu' or 'cuda'), train.precision and the packages installed. Checked at train start."""
        return []

    def kernels(self, device: str, precision: str) -> str:
        """Which kernels a run on `device` ('cpu' or 'cuda') at `precision` uses, for the log."""
        return ""

    def layout_problems(self, tp: int) -> list[str]:
        """What the family's parallel plan needs of this model for a tensor-parallel size `tp`
        (e.g. heads divisible by it); kept beside the config, so checking one needs no torch."""
        return []


@dataclass(frozen=True)
class ModelShape:
    """What a model needs beyond its config: sizes fixed by the data (the vocabulary padded)."""

    vocab_size: int
    seq_len: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> ModelShape:
        """The shape of a config whose vocab_size and seq_len are resolved: the embedding and
        output rows are vocab_size rounded up to model.vocab_multiple."""
        rows = -(-cfg.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
        return cls(vocab_size=rows, seq_len=cfg.seq_len)


@dataclass(frozen=True)
class ModelFamily:
    """Everything the framework needs to build, parallelise, cost and convert one family."""

    name: str
    build: Callable[..., Any]
    """build(cfg, shape, device=None, seed=0) -> nn.Module: on device="meta" without storage (to be
    parallelised, then materialised by pretrain.models.init.materialise), else materialised and
    initialised keyed by seed; `module.init_weights(seed)` (re)initialises it, whole or sharded."""
    parallelize: Callable[..., Any]
    """parallelize(module, layout, mesh, parallel_cfg) -> the module, parallelised in place."""
    build_stage: Callable[..., Any]
    """build_stage(cfg, shape, stage, layers_per_stage) -> on the meta device, the part of the
    model pipeline stage `stage` owns (its blocks, and the embedding or head), with the full
    model's parameter names."""
    forward_flops: Callable[..., int]
    """forward_flops(cfg, shape) -> forward FLOPs of one sequence (backward = 2x)."""
    to_official: Callable[[dict, Any], dict]
    """to_official(state, cfg): state dict with this framework's names -> the family's published
    checkpoint layout, for a model of `cfg`."""
    from_official: Callable[[dict, Any], dict]
    """from_official(state, cfg): the inverse of to_official (exact: export then import gives
    the same tensors bit for bit)."""
    upgrade_state: Callable[[dict, Any], dict]
    """upgrade_state(state, cfg): a state dict (any key prefix) holding the parameter names of an
    earlier version of this framework -> today's names; the same dict when it has none."""
    official_config: Callable[..., dict]
    """official_config(cfg, strict) -> the published layout's config.json fields (auto_map to
    hf_modeling_file's classes included) for a model of `cfg` (vocab_size and seq_len resolved);
    strict: a UserError for a model the released code could not build."""
    model_fields: Callable[[dict], dict]
    """model_fields(config_json) -> the `model:` section fields a published config.json sets."""
    official_buffers: Callable[..., dict]
    """official_buffers(cfg) -> the persistent buffers the published state dict carries beside the
    parameters (their values follow from the config), under their published names."""
    hf_prefix: str
    """What the family's Hugging Face class keeps its network under: every weight name of an
    exported folder starts with it, in either layout (e.g. "backbone.")."""
    vocab_parameters: tuple[str, ...]
    """Parameters whose first dimension is the (padded) vocabulary: what conversion re-pads."""
    hf_modeling_file: str
    """Path of the self-contained modeling file (torch and transformers only) that an exported
    Hugging Face folder carries as remote code; official_config's auto_map names its classes."""
    weight_sources: Callable[..., list] | None = None
    """weight_sources(name, cfg, official) -> where parameter `name` is stored, for reading one
    parameter at a time into its shards: candidates [(stored names, combine)], the first whose
    tensors are all stored taken; combine(full tensors) -> the parameter's full tensor, or None
    when it is one stored tensor renamed (then only a shard's slice of it is read). official: the
    published layout (full names); else this framework's (names under the reader's prefix). None:
    every reader loads the family's weights whole."""


def family_names() -> list[str]:
    """The families installed: the subpackages of this package."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)


def _known(name: str) -> None:
    if name not in family_names():
        from pretrain.errors import ConfigError

        raise ConfigError(f"model.family={name!r} is not a model family; known: {', '.join(family_names())}")


def family_config(name: str) -> type[ModelConfig]:
    """The `model:` section dataclass of family `name` (no torch import)."""
    _known(name)
    return importlib.import_module(f"{__name__}.{name}.config").CONFIG


def get_family(name: str) -> ModelFamily:
    """Family `name`: its builder, plan, FLOPs and checkpoint names."""
    _known(name)
    return importlib.import_module(f"{__name__}.{name}.family").FAMILY


def count_parameters(model) -> int:
    """Parameters of an nn.Module (works on the meta device: nothing is allocated)."""
    return sum(p.numel() for p in model.parameters())
