"""The DiT against the published MDLM/ProSeCo Hugging Face layout (kuleshov-group/mdlm-owt,
proseco-owt): parameter names, config.json fields and the buffers its state dict carries.

Names: the same module tree under `backbone.`, except that the embedding is a bare parameter
(`vocab_embed.embedding`) and q, k, v are one fused `attn_qkv` projection whose rows are [q; k; v]
(split here because tensor parallelism shards by heads). The state dict also holds the rotary
`inv_freq` buffer. config.json holds ProsecoConfig's fields; the released DiT fixes the MLP ratio
(4) and the rotary base (1e4), which this framework's models may change."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pretrain.errors import UserError
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
_QKV = re.compile(r"^blocks\.(\d+)\.attn_qkv\.weight$")
_SPLIT = re.compile(r"^blocks\.(\d+)\.attn_([qkv])\.weight$")


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This framework's DiT state dict -> the published layout's names (q, k, v fused)."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        split = _SPLIT.match(name)
        if split:
            parts.setdefault(split.group(1), {})[split.group(2)] = tensor
            continue
        out[PREFIX + (_EMBEDDING[1] if name == _EMBEDDING[0] else name)] = tensor
    for block, qkv in parts.items():
        out[f"{PREFIX}blocks.{block}.attn_qkv.weight"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published layout's state dict -> this framework's names (attn_qkv split in three)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not name.startswith(PREFIX):
            continue  # e.g. the noise schedule's buffers outside the backbone
        name = name[len(PREFIX):]
        fused = _QKV.match(name)
        if fused:
            q, k, v = tensor.chunk(3)
            for letter, part in zip("qkv", (q, k, v)):
                out[f"blocks.{fused.group(1)}.attn_{letter}.weight"] = part
            continue
        out[_EMBEDDING[0] if name == _EMBEDDING[1] else name] = tensor
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
            "cfg": False, "cfg_num_classes": -1, "return_dict": False}


def model_fields(config: dict) -> dict:
    """DiTConfig fields of a config.json in the published layout (UserError naming a missing or
    unsupported field)."""
    if config.get("cfg"):
        raise UserError("config.json has cfg=true: a class-conditional model (a label embedding, cond_map), "
                        "which this framework's DiT does not have")
    missing = [name for name in _FIELDS if name not in config]
    if missing:
        raise UserError(f"config.json lacks {missing[0]}, a field of the published ProsecoConfig "
                        f"(expected: {', '.join(_FIELDS)})")
    fields = {name: config[json_name] for json_name, name in _FIELDS.items()}
    fields.update({name: config.get(json_name, RELEASED_FIXED[name]) for json_name, name in _OPTIONAL.items()})
    return fields


def official_buffers(cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """The rotary frequencies the published state dict saves, computed as model.py's Rotary does."""
    head_dim = cfg.d_model // cfg.n_heads
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return {f"{PREFIX}rotary_emb.inv_freq": inv_freq}
