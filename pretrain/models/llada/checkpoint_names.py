"""LLaDA against the published Hugging Face layout (GSAI-ML/LLaDA-8B-Base, -Instruct): parameter
names, config.json fields and the buffers its state dict carries.

Names: the published LLaDAModelLM keeps its network under `model.transformer.` with the module
names model.py uses (wte; blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj,
up_proj, ff_out}; ln_f; ff_out), so conversion is the prefix alone, exact in both directions. The
rotary tables are not in the state dict (no buffers). config.json holds the OLMo-style fields of
the published config; the block type (llama), RMSNorm, SiLU-gated MLP, rotary positions, no biases
and an untied output layer are what this family builds, and a config.json asking for anything else
is refused by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.errors import UserError
from pretrain.models.llada.config import LLaDAConfig

PREFIX = "model.transformer."
MODELING_FILE = str(Path(__file__).with_name("modeling_llada.py"))
AUTO_MAP = {"AutoConfig": "modeling_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
VOCAB_PARAMETERS = ("wte.weight", "ff_out.weight")
# config.json field -> LLaDAConfig field
_FIELDS = {"vocab_size": "vocab_size", "max_sequence_length": "seq_len", "d_model": "d_model",
           "n_layers": "n_layers", "n_heads": "n_heads"}
_OPTIONAL = {"n_kv_heads": ("n_kv_heads", None), "rope_theta": ("rope_theta", 10000.0),
             "rms_norm_eps": ("rms_norm_eps", 1e-5)}  # with the published code's defaults
# What this family builds, and config.json must say (the published code's defaults differ).
ARCHITECTURE = {"block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "rope": True,
                "weight_tying": False, "include_bias": False}
# Options this family does not build: absent, or set to these values.
_OFF = {"alibi": False, "include_qkv_bias": False, "scale_logits": False, "input_emb_norm": False,
        "attention_layer_norm": False, "multi_query_attention": False, "clip_qkv": None,
        "bias_for_layer_norm": False, "layer_norm_with_affine": True, "block_group_size": 1,
        "residual_dropout": 0.0, "attention_dropout": 0.0, "embedding_dropout": 0.0}


def to_official(state: dict[str, torch.Tensor], cfg: LLaDAConfig) -> dict[str, torch.Tensor]:
    """This framework's LLaDA state dict -> the published layout's names."""
    return {PREFIX + name: tensor for name, tensor in state.items()}


def from_official(state: dict[str, torch.Tensor], cfg: LLaDAConfig) -> dict[str, torch.Tensor]:
    """The published layout's state dict -> this framework's names (the inverse of to_official)."""
    return {name[len(PREFIX):] if name.startswith(PREFIX) else name: tensor for name, tensor in state.items()}


def weight_sources(name: str, cfg: LLaDAConfig, official: bool) -> list[tuple[tuple[str, ...], None]]:
    """Where parameter `name` is stored, one parameter at a time: the parameter itself, renamed
    (None: any slice of it can be read alone), in both layouts. official: the published layout,
    its full name; else this framework's, the name under the reader's own prefix."""
    return [((PREFIX + name if official else name,), None)]


def upgrade_state(state: dict[str, torch.Tensor], cfg: LLaDAConfig) -> dict[str, torch.Tensor]:
    """No earlier names: the family's first version. The same dict."""
    return state


def official_config(cfg: LLaDAConfig, strict: bool = True) -> dict:
    """config.json of a model of `cfg` (vocab_size and seq_len resolved): the published config's
    architecture fields and the auto_map to this project's modeling file. The published code builds
    every model of this family, so `strict` refuses nothing. The mask id is the tokenizer's (its
    folder rides along with an export), not written here."""
    fields = {json_name: getattr(cfg, name) for json_name, name in _FIELDS.items()}
    fields.update({json_name: getattr(cfg, name) for json_name, (name, _) in _OPTIONAL.items()})
    return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "auto_map": dict(AUTO_MAP), **fields,
            "embedding_size": cfg.vocab_size, "mlp_hidden_size": cfg.mlp_hidden_size, **ARCHITECTURE,
            **_OFF, "rope_full_precision": True, "use_cache": False}


def model_fields(config: dict) -> dict:
    """LLaDAConfig fields of a config.json in the published layout (UserError naming a missing
    field, or one asking for an architecture this family does not build)."""
    missing = [name for name in (*_FIELDS, *ARCHITECTURE) if name not in config]
    if missing:
        raise UserError(f"config.json lacks {missing[0]}, a field of the published LLaDA config "
                        f"(expected: {', '.join((*_FIELDS, *ARCHITECTURE))})")
    for name, value in {**ARCHITECTURE, **_OFF}.items():
        if config.get(name, value) is None and name in _OFF:
            continue  # null: the published code's "unset", i.e. off (bias_for_layer_norm follows include_bias)
        if name in config and config[name] != value:
            raise UserError(f"config.json has {name}={config[name]!r}; this framework's LLaDA builds {name}="
                            f"{value!r} only (LLaDA 8B's)")
    if config.get("embedding_size") not in (None, config["vocab_size"]):
        raise UserError(f"config.json has embedding_size={config['embedding_size']} beside vocab_size="
                        f"{config['vocab_size']}; this framework pads the rows itself (model.vocab_multiple): "
                        "set embedding_size to vocab_size or remove it")
    fields = {name: config[json_name] for json_name, name in _FIELDS.items()}
    fields.update({name: config.get(json_name, default) for json_name, (name, default) in _OPTIONAL.items()})
    hidden = config.get("mlp_hidden_size")
    fields["mlp_hidden_size"] = hidden if hidden is not None else config.get("mlp_ratio", 4) * config["d_model"]
    return fields


def official_buffers(cfg: LLaDAConfig) -> dict[str, torch.Tensor]:
    """None: the published state dict holds parameters only (the rotary tables are recomputed)."""
    return {}
