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
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_FAMILY = "dit"


@dataclass
class ModelConfig:
    """What every model family's `model:` section has: the family and the sizes fixed by data.
    A family's subclass adds its own fields and a `num_layers` property (the blocks a pipeline
    splits into stages)."""

    family: str = DEFAULT_FAMILY
    """Model family: a subpackage of pretrain/models (dit)."""
    vocab_size: int | None = None
    """Real vocabulary including the mask token; None takes it from the shards' tokenizer."""
    vocab_multiple: int = 64
    """Embedding and output rows are padded to a multiple of this (the same on every layout, so
    checkpoints reshard; tensor parallelism splits them evenly). Padding rows are never predicted."""
    seq_len: int | None = None
    """Sequence length; None takes it from the shards' manifest."""

    def problems(self) -> list[str]:
        """The family's own field checks, each naming the field and the fix."""
        return []

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
    """build(cfg, shape, device=None) -> nn.Module with the family's initialisation."""
    parallelize: Callable[..., Any]
    """parallelize(module, layout, mesh, parallel_cfg) -> the module, parallelised in place."""
    build_stage: Callable[..., Any]
    """build_stage(full, stage, layers_per_stage) -> the part of `full` pipeline stage `stage` owns."""
    forward_flops: Callable[..., int]
    """forward_flops(cfg, shape) -> forward FLOPs of one sequence (backward = 2x)."""
    to_official: Callable[[dict], dict]
    """State dict with this framework's names -> the family's published checkpoint layout."""
    from_official: Callable[[dict], dict]
    """The inverse of to_official."""


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
