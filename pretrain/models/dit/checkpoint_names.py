"""The DiT against the published MDLM/ProSeCo Hugging Face layout (kuleshov-group/mdlm-owt,
proseco-owt): parameter names, config.json fields and the buffers its state dict carries.

Names: the same module tree under `backbone.`, except that the embedding is a bare parameter
(`vocab_embed.embedding`). Both have one fused `attn_qkv` projection, but its rows are ordered
differently: the published one is [q; k; v] ([3, H, hd]: all heads' q, then k, then v), ours is
head-major ([H, 3, hd]: each head's q, k and v together), so that tensor parallelism can shard it
into contiguous row blocks of whole heads. Conversion permutes the rows (exactly: a permutation).
Checkpoints of this framework written before the fusion hold `attn_q`, `attn_k`, `attn_v` apart;
`upgrade_state` fuses them on load. The state dict also holds the rotary `inv_freq` buffer.
config.json holds ProsecoConfig's fields; the released DiT fixes the MLP ratio (4) and the rotary
base (1e4), which this framework's models may change."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from pretrain.errors import CheckpointError, UserError
from pretrain.models.dit.config import DiTConfig

PREFIX = "backbone."
MODELING_FILE = str(Path(__file__).with_name("modeling_proseco.py"))
AUTO_MAP = {"AutoConfig": "modeling_proseco.ProsecoConfig", "AutoModelForMaskedLM": "modeling_proseco.Proseco"}
RELEASED_FIXED = {"mlp_ratio": 4, "rope_base": 10000.0}  # the released DiT's constants
VOCAB_PARAMETERS = ("vocab_embed.weight", "output_layer.linear.weight", "output_layer.linear.bias")
# config.json field -> DiTConfig field
_FIELDS = {"vocab_size": "vocab_size", "model_length": "seq_len", "hidden_dim": "d_model", "cond_dim": "cond_dim",
           "n_blocks": "n_layers", "n_heads": "n_heads", "dropout": "dropout",
           "time_conditioning": "time_conditioning"}
_OPTIONAL = {"mlp_ratio": "mlp_ratio", "rope_base": "rope_base"}  # absent from the released config.json
_EMBEDDING = ("vocab_embed.weight", "vocab_embed.embedding")
_QKV = re.compile(r"^blocks\.\d+\.attn_qkv\.weight$")
# attn_q/attn_k/attn_v of checkpoints written before the fusion, under any prefix ("ema.", "backbone.")
_LEGACY_QKV = re.compile(r"^(.*\bblocks\.\d+\.)attn_([qkv])\.weight$")
Combine = Callable[[list[torch.Tensor]], torch.Tensor]  # stored full tensors -> one parameter's full tensor


def head_major_from_official(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """attn_qkv rows [3, H, hd] (the published order) -> [H, 3, hd] (this framework's)."""
    return weight.unflatten(0, (3, n_heads, -1)).transpose(0, 1).flatten(0, 2)


def official_from_head_major(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """attn_qkv rows [H, 3, hd] (this framework's order) -> [3, H, hd] (the published one)."""
    return weight.unflatten(0, (n_heads, 3, -1)).transpose(0, 1).flatten(0, 2)


def to_official(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """This framework's DiT state dict -> the published layout's names and qkv row order."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if _QKV.match(name):
            tensor = official_from_head_major(tensor, cfg.n_heads)
        out[PREFIX + (_EMBEDDING[1] if name == _EMBEDDING[0] else name)] = tensor
    return out


def from_official(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """The published layout's state dict -> this framework's names and qkv row order."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not name.startswith(PREFIX):
            continue  # e.g. the noise schedule's buffers outside the backbone
        name = name[len(PREFIX):]
        if _QKV.match(name):
            tensor = head_major_from_official(tensor, cfg.n_heads)
        out[_EMBEDDING[0] if name == _EMBEDDING[1] else name] = tensor
    return out


def weight_sources(name: str, cfg: DiTConfig, official: bool) -> list[tuple[tuple[str, ...], Combine | None]]:
    """Where parameter `name` is stored, one parameter at a time (the per-tensor inverse of
    to_official, and of the earlier names upgrade_state maps): candidates in order of preference,
    each the stored tensors' names and how their full tensors make the parameter's, None for the
    parameter itself renamed (so any slice of it can be read alone). official: the published
    layout, full names; else this framework's layout, names under the reader's own prefix."""
    if official:
        stored = PREFIX + (_EMBEDDING[1] if name == _EMBEDDING[0] else name)
        if _QKV.match(name):
            return [((stored,), lambda tensors: head_major_from_official(tensors[0], cfg.n_heads))]
        return [((stored,), None)]
    candidates: list[tuple[tuple[str, ...], Combine | None]] = [((name,), None)]
    if _QKV.match(name):  # a checkpoint written before the fusion: the three projections apart
        block = name[:-len("attn_qkv.weight")]
        candidates.append((tuple(f"{block}attn_{x}.weight" for x in "qkv"),
                           lambda tensors: head_major_from_official(torch.cat(tensors), cfg.n_heads)))
    return candidates


def upgrade_state(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """A state dict with the names of earlier versions of this framework -> today's (the same
    dict when it has none): each block's separate attn_q, attn_k, attn_v (under any prefix, e.g.
    "ema.") fused into one head-major attn_qkv. Works on meta tensors (shapes only)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        legacy = _LEGACY_QKV.match(name)
        if legacy:
            parts.setdefault(legacy.group(1), {})[legacy.group(2)] = tensor
        else:
            out[name] = tensor
    for block, qkv in parts.items():
        if len(qkv) != 3:
            missing = sorted(set("qkv") - set(qkv))
            raise CheckpointError(f"{block}attn_{missing[0]}.weight is missing beside {block}attn_"
                                  f"{next(iter(qkv))}.weight: the old q/k/v projections need all three")
        shapes = {tuple(t.shape) for t in qkv.values()}
        if len(shapes) > 1 or next(iter(shapes))[0] % cfg.n_heads:
            raise CheckpointError(f"{block}attn_q/k/v.weight have shapes {[list(t.shape) for t in qkv.values()]}: "
                                  f"not three equal projections of {cfg.n_heads} heads (model.n_heads)")
        out[f"{block}attn_qkv.weight"] = head_major_from_official(torch.cat([qkv["q"], qkv["k"], qkv["v"]]),
                                                                  cfg.n_heads)
    return out


def official_config(cfg: DiTConfig, strict: bool = True) -> dict:
    """config.json of a model of `cfg` (vocab_size and seq_len resolved): ProsecoConfig's fields as
    proseco-owt sets them, mlp_ratio and rope_base (read by this project's modeling file), and the
    auto_map to it. strict: refuse what the released DiT could not build."""
    changed = [f"model.{name}={getattr(cfg, name)}" for name, value in RELEASED_FIXED.items()
               if getattr(cfg, name) != value]
    if strict and changed:
        fixed = ", ".join(f"{name}={value}" for name, value in RELEASED_FIXED.items())
        raise UserError(f"the paper's layout cannot hold this model: its DiT fixes {fixed}, this one has "
                        f"{', '.join(changed)}; export it in the proseco-pretrain layout instead")
    fields = {json_name: getattr(cfg, name) for json_name, name in {**_FIELDS, **_OPTIONAL}.items()}
    return {"model_type": "proseco", "architectures": ["Proseco"], "auto_map": dict(AUTO_MAP), **fields,
            "cfg": bool(cfg.num_classes), "cfg_num_classes": cfg.num_classes or -1, "return_dict": False}


def model_fields(config: dict) -> dict:
    """DiTConfig fields of a config.json in the published layout (UserError naming a missing or
    unsupported field)."""
    missing = [name for name in _FIELDS if name not in config]
    if missing:
        raise UserError(f"config.json lacks {missing[0]}, a field of the published ProsecoConfig "
                        f"(expected: {', '.join(_FIELDS)})")
    fields = {name: config[json_name] for json_name, name in _FIELDS.items()}
    fields.update({name: config.get(json_name, RELEASED_FIXED[name]) for json_name, name in _OPTIONAL.items()})
    if config.get("cfg"):  # class-conditional: a label embedding (cond_map) of cfg_num_classes + 1 rows
        if not isinstance(config.get("cfg_num_classes"), int) or config["cfg_num_classes"] < 1:
            raise UserError(f"config.json has cfg=true but cfg_num_classes={config.get('cfg_num_classes')!r}: "
                            "a class-conditional model needs its number of classes (>= 1)")
        fields["num_classes"] = config["cfg_num_classes"]
    return fields


def official_buffers(cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """The rotary frequencies the published state dict saves, computed as model.py's Rotary does."""
    head_dim = cfg.d_model // cfg.n_heads
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return {f"{PREFIX}rotary_emb.inv_freq": inv_freq}
