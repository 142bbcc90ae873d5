"""The DiT as a Hugging Face model: the remote code `proseco convert export` copies into a folder.

    AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)(input_ids) -> logits [B, L, vocab_size]

transformers copies this file into its module cache and imports it on machines where this project
is not installed, so it imports torch and transformers only; it is therefore a second, inference-
only rendering of pretrain/models/dit/model.py (no tensor-parallel plan, no flash-attn, no pipeline
stages), and tests/test_convert.py checks that it returns that model's logits. One file serves both
weight layouts of a folder, chosen by config.json's `weights_layout`:

- "proseco-pretrain" (this framework's): the training model's parameter names under `backbone.`,
  the fused `attn_qkv` rows head-major ([H, 3, head_dim]: each head's q, k, v), the vocabulary
  rows padded to `vocab_rows`;
- "proseco-hf" (the paper's, kuleshov-group/proseco-owt): fused `attn_qkv` rows [q; k; v]
  ([3, H, head_dim]), the embedding a bare `vocab_embed.embedding` parameter, `vocab_size` rows.

As the released models: the forward returns raw logits (the mask logit is not suppressed, SUBS
is not applied), and `timesteps` is zeroed when `time_conditioning` is off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

FREQUENCY_FEATURES = 256  # sinusoidal features of the noise level


class ProsecoConfig(PretrainedConfig):
    """The paper's ProsecoConfig fields, plus what this framework's models may vary."""

    model_type = "proseco"

    def __init__(self, vocab_size: int = 50258, model_length: int = 1024, hidden_dim: int = 768,
                 cond_dim: int = 128, n_blocks: int = 12, n_heads: int = 12, dropout: float = 0.1,
                 time_conditioning: bool = False, cfg: bool = False, cfg_num_classes: int = -1,
                 mlp_ratio: int = 4, rope_base: float = 10000.0, vocab_rows: int | None = None,
                 weights_layout: str = "proseco-hf", **kwargs):
        self.vocab_size, self.model_length, self.hidden_dim = vocab_size, model_length, hidden_dim
        self.cond_dim, self.n_blocks, self.n_heads, self.dropout = cond_dim, n_blocks, n_heads, dropout
        self.time_conditioning, self.cfg, self.cfg_num_classes = time_conditioning, cfg, cfg_num_classes
        self.mlp_ratio, self.rope_base, self.weights_layout = mlp_ratio, rope_base, weights_layout
        self.vocab_rows = vocab_rows or vocab_size  # embedding and output rows (padding rows are never returned)
        super().__init__(**kwargs)


class LayerNorm(nn.Module):
    """Weight-only LayerNorm, normalised in fp32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), [x.shape[-1]]) * self.weight


class BareEmbedding(nn.Module):
    """The paper's input embedding: a bare [rows, dim] parameter named `embedding`."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(rows, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_FEATURES, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = FREQUENCY_FEATURES // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Rotary(nn.Module):
    """Rotary tables (rotate-half layout). inv_freq is a saved buffer, as in the released models."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, H, hd] rotated by position, in fp32."""
        positions = torch.arange(x.shape[1], dtype=torch.float32, device=x.device)
        angles = torch.outer(positions, self.inv_freq.float())
        angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]
        xf = x.float()
        half = xf.shape[-1] // 2
        return xf * angles.cos() + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * angles.sin()


class DiTBlock(nn.Module):
    def __init__(self, config: ProsecoConfig):
        super().__init__()
        d, hidden = config.hidden_dim, config.mlp_ratio * config.hidden_dim
        self.n_heads, self.head_major = config.n_heads, config.weights_layout != "proseco-hf"
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.dropout = nn.Dropout(config.dropout)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * d)

    def _qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v [B, L, H, hd]: the projection's last dimension is [H, 3, hd] or [3, H, hd]."""
        projected = self.attn_qkv(h)
        order = (self.n_heads, 3, -1) if self.head_major else (3, self.n_heads, -1)
        return projected.unflatten(-1, order).unbind(dim=-2 if self.head_major else -3)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, 2)
        q, k, v = self._qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        q, k = rotary(q).to(v.dtype), rotary(k).to(v.dtype)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + gate_msa * self.dropout(self.attn_out(attn.transpose(1, 2).flatten(2)))
        return x + gate_mlp * self.dropout(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, config: ProsecoConfig):
        super().__init__()
        self.norm_final = LayerNorm(config.hidden_dim)
        self.linear = nn.Linear(config.hidden_dim, config.vocab_rows)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LabelEmbedder(nn.Module):
    """Class label -> a vector added to c (cfg=True): cfg_num_classes + 1 rows, the last the null class."""

    def __init__(self, num_classes: int, cond_dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, cond_dim)


class DiTBackbone(nn.Module):
    def __init__(self, config: ProsecoConfig):
        super().__init__()
        rows, d = config.vocab_rows, config.hidden_dim
        self.vocab_embed = BareEmbedding(rows, d) if config.weights_layout == "proseco-hf" else nn.Embedding(rows, d)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.cond_map = LabelEmbedder(config.cfg_num_classes, config.cond_dim) if config.cfg else None
        self.rotary_emb = Rotary(d // config.n_heads, config.rope_base)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_blocks))
        self.output_layer = FinalLayer(config)

    def forward(self, input_ids: torch.Tensor, sigma: torch.Tensor,
                cond: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, c = self.vocab_embed(input_ids), F.silu(self.sigma_map(sigma))
        if self.cond_map is not None:  # no label: the null class (the unconditional model)
            if cond is None:
                cond = torch.full((input_ids.shape[0],), self.cond_map.embedding_table.num_embeddings - 1,
                                  dtype=torch.long, device=input_ids.device)
            c = c + F.silu(self.cond_map.embedding_table(cond))
        hidden = [x]
        for block in self.blocks:
            x = block(x, c, self.rotary_emb)
            hidden.append(x)
        return self.output_layer(x, c), hidden


class Proseco(PreTrainedModel):
    """input_ids [B, L] (+ timesteps [B]) -> raw logits [B, L, vocab_size]."""

    config_class = ProsecoConfig
    base_model_prefix = "backbone"

    def __init__(self, config: ProsecoConfig):
        super().__init__(config)
        self.backbone = DiTBackbone(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Upstream's initialisation, for a model built without weights (from_config). transformers
        calls it children first and, while loading a folder, skips the tensors the folder holds
        (it guards torch.nn.init), so only torch.nn.init functions write here."""
        if isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # nn.Linear's own default
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                nn.init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.Embedding, BareEmbedding)):
            nn.init.kaiming_uniform_(next(module.parameters()), a=math.sqrt(5))
        elif isinstance(module, LayerNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Rotary):  # a folder without the buffer: recomputed (it is not learned)
            head_dim = 2 * module.inv_freq.numel()
            frequencies = 1.0 / (self.config.rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim))
            module.inv_freq.copy_(frequencies)
        if isinstance(module, (DiTBlock, FinalLayer)):  # adaLN-Zero: every modulation starts at zero
            zeroed = [module.adaLN_modulation] + ([module.linear] if isinstance(module, FinalLayer) else [])
            for layer in zeroed:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, input_ids: torch.Tensor, timesteps: torch.Tensor | None = None, cond=None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs):
        if timesteps is None or not self.config.time_conditioning:
            timesteps = torch.zeros(input_ids.shape[0], device=input_ids.device)
        logits, hidden = self.backbone(input_ids, timesteps, cond)
        logits = logits[..., : self.config.vocab_size]  # padding rows (proseco-pretrain layout) are never predicted
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if return_dict:
            return MaskedLMOutput(logits=logits, hidden_states=tuple(hidden) if output_hidden_states else None)
        return (logits, tuple(hidden)) if output_hidden_states else logits
