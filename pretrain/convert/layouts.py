"""The two weight layouts of a Hugging Face folder, for any model family.

- `proseco-pretrain` (this framework's, the default): the training model's parameter names under
  the family's `hf_prefix`, the vocabulary rows as trained (padded to model.vocab_multiple), and
  the whole run config in config.json: export then import gives back every tensor bit for bit.
- `proseco-hf` (the paper's, kuleshov-group/proseco-owt): the family's published names and
  config.json fields (`ModelFamily.to_official`, `official_config`), the real vocabulary only,
  so code written for the released models loads it.

Both also carry the published persistent buffers (`official_buffers`, e.g. the rotary
frequencies), and both are read by the family's own modeling file. The family's vocabulary
parameters are re-padded on the way in (rows past the real vocabulary are never looked up or
predicted, so they start at zero).
"""

from __future__ import annotations

import torch

from pretrain.config import RunConfig, to_dict
from pretrain.errors import CheckpointError
from pretrain.models import ModelConfig, ModelFamily, ModelShape

PRETRAIN, PAPER = "proseco-pretrain", "proseco-hf"
LAYOUTS = (PRETRAIN, PAPER)
LAYOUT_FIELD = "weights_layout"  # config.json: which layout; the released folders have none (the paper's)


def layout_of(config_json: dict) -> str:
    layout = config_json.get(LAYOUT_FIELD, PAPER)
    if layout not in LAYOUTS:
        raise CheckpointError(f"config.json has {LAYOUT_FIELD}={layout!r}; known layouts: {', '.join(LAYOUTS)}")
    return layout


def resize_vocab_rows(tensor: torch.Tensor, vocab_size: int, rows: int) -> torch.Tensor:
    """`tensor` with `rows` rows: the first vocab_size kept, the padding rows after them zero.
    Unchanged when it already has `rows` rows."""
    if tensor.shape[0] == rows:
        return tensor
    kept = tensor[:vocab_size]
    padding = tensor.new_zeros((rows - vocab_size, *tensor.shape[1:]))
    return torch.cat([kept, padding])


def resize_vocab(family: ModelFamily, weights: dict[str, torch.Tensor], vocab_size: int,
                 rows: int) -> dict[str, torch.Tensor]:
    """The family's vocabulary parameters re-padded to `rows` rows (the others as they are)."""
    return {name: resize_vocab_rows(t, vocab_size, rows) if name in family.vocab_parameters else t
            for name, t in weights.items()}


def to_folder(family: ModelFamily, cfg: ModelConfig, weights: dict[str, torch.Tensor],
              layout: str) -> dict[str, torch.Tensor]:
    """Full weights under this framework's names -> the folder's tensors in `layout`."""
    if layout == PAPER:
        tensors = family.to_official(resize_vocab(family, weights, cfg.vocab_size, cfg.vocab_size), cfg)
    else:
        tensors = {family.hf_prefix + name: t for name, t in weights.items()}
    return {**tensors, **family.official_buffers(cfg)}


def folder_config(family: ModelFamily, cfg: RunConfig, layout: str) -> dict:
    """config.json of a folder in `layout` for a run of `cfg` (vocab_size and seq_len resolved)."""
    fields = family.official_config(cfg.model, strict=layout == PAPER)
    if layout == PRETRAIN:
        fields.update({LAYOUT_FIELD: PRETRAIN, "vocab_rows": ModelShape.of(cfg.model).vocab_size,
                       "run_config": to_dict(cfg)})
    return fields


def from_folder(family: ModelFamily, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                layout: str) -> dict[str, torch.Tensor]:
    """The folder's tensors (checked by `check_shapes`) -> full weights under this framework's
    names, the vocabulary rows padded to the config's, in float32 (exact from any float type)."""
    buffers = family.official_buffers(cfg)
    check_buffers(buffers, tensors)
    weights = {name: t for name, t in tensors.items() if name not in buffers}
    for name, t in weights.items():
        check_weight(name, t)
    if layout == PAPER:
        weights = family.from_official(weights, cfg)
    else:  # an export of an earlier version may hold older names
        weights = family.upgrade_state({name[len(family.hf_prefix):]: t for name, t in weights.items()}, cfg)
    weights = {name: t.to(torch.float32) for name, t in weights.items()}
    return resize_vocab(family, weights, cfg.vocab_size, ModelShape.of(cfg).vocab_size)


def check_buffers(buffers: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """CheckpointError unless each published buffer a folder holds (`tensors`, by name) has the
    values the model config gives it (`buffers`, the family's official_buffers)."""
    for name, expected in buffers.items():
        if name in tensors and not torch.allclose(tensors[name].float(), expected, rtol=1e-6, atol=0):
            raise CheckpointError(f"{name} does not hold the values this model config gives it (rope base "
                                  "or head size differ from config.json's)")


def check_weight(name: str, tensor: torch.Tensor) -> None:
    """CheckpointError unless stored weight `name` is floating point (any float type converts exactly)."""
    if not tensor.is_floating_point():
        raise CheckpointError(f"{name} is a {tensor.dtype} tensor; model weights are floating point")


def expected_shapes(family: ModelFamily, cfg: ModelConfig, layout: str, rows: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a folder in `layout` holds for a model of `cfg` whose
    vocabulary parameters have `rows` rows (built on the meta device: nothing is allocated)."""
    meta = family.build(cfg, ModelShape(vocab_size=rows, seq_len=cfg.seq_len), device="meta")
    weights = {name: p.detach() for name, p in meta.named_parameters()}
    return {name: tuple(t.shape) for name, t in to_folder(family, cfg, weights, layout).items()}


def upgraded_shapes(family: ModelFamily, cfg: ModelConfig,
                    shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of stored tensors, with the names of an earlier version of this framework
    (e.g. a block's separate attn_q, attn_k, attn_v) mapped onto today's as loading maps them
    (`ModelFamily.upgrade_state`, run on meta tensors: nothing is allocated)."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    return {name: tuple(t.shape) for name, t in family.upgrade_state(meta, cfg).items()}


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str,
                 model: str, optional: frozenset[str] = frozenset()) -> None:
    """CheckpointError naming the first key that is missing, has another shape, or is not expected
    (in that order; expected keys in the model's order): `where` says what was read, `model` what
    it was compared with."""
    for name, shape in expected.items():
        if name not in found:
            if name in optional:
                continue
            raise CheckpointError(f"{where}: {name} is missing; {model} has it with shape {list(shape)}")
        if tuple(found[name]) != shape:
            raise CheckpointError(f"{where}: {name} has shape {list(found[name])}, but {model} has {list(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: {extra[0]} (shape {list(found[extra[0]])}) is not a tensor of {model}"
                              + (f" ({len(extra) - 1} more unexpected)" if len(extra) > 1 else ""))
