"""Parameter names of the DiT against the published MDLM/ProSeCo Hugging Face layout
(kuleshov-group/mdlm-owt, proseco-owt): the same module tree under `backbone.`, except that the
embedding is a bare parameter (`vocab_embed.embedding`) and q, k, v are one fused `attn_qkv`
projection whose rows are [q; k; v] (split here because tensor parallelism shards by heads)."""

from __future__ import annotations

import re

import torch

PREFIX = "backbone."
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
