"""LLaDA as a Hugging Face model: the remote code `proseco convert export` copies into a folder.

    AutoModel.from_pretrained(folder, trust_remote_code=True)(input_ids).logits -> [B, L, vocab_size]

transformers copies this file into its module cache and imports it on machines where this project
is not installed, so it imports torch and transformers only; it is therefore a second, inference-
only rendering of pretrain/models/llada/model.py (no tensor-parallel plan, no pipeline stages), and
tests/test_llada.py checks that it returns that model's logits. Its module tree is the published
one (LLaDAModelLM.model.transformer.{wte, blocks.N.*, ln_f, ff_out}), so it reads both weight
layouts of a folder, which differ only in their vocabulary rows, chosen by config.json's
`weights_layout`:

- "proseco-pretrain" (this framework's): the rows padded to `vocab_rows`;
- "proseco-hf" (the published one, GSAI-ML/LLaDA-8B-Base): `embedding_size` (or `vocab_size`) rows.

As the released models: the forward returns raw logits over the whole sequence (bidirectional
attention, no mask suppression), and `attention_mask` is not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class LLaDAConfig(PretrainedConfig):
    """The published LLaDA config's architecture fields (OLMo-style names)."""

    model_type = "llada"

    def __init__(self, d_model: int = 4096, n_layers: int = 32, n_heads: int = 32, n_kv_heads: int | None = None,
                 mlp_hidden_size: int | None = 12288, mlp_ratio: int = 4, vocab_size: int = 126464,
                 embedding_size: int | None = None, max_sequence_length: int = 4096, rope_theta: float = 500000.0,
                 rms_norm_eps: float = 1e-5, vocab_rows: int | None = None, weights_layout: str = "proseco-hf",
                 **kwargs):
        self.d_model, self.n_layers, self.n_heads, self.n_kv_heads = d_model, n_layers, n_heads, n_kv_heads
        self.mlp_hidden_size = mlp_hidden_size if mlp_hidden_size is not None else mlp_ratio * d_model
        self.mlp_ratio, self.vocab_size, self.embedding_size = mlp_ratio, vocab_size, embedding_size
        self.max_sequence_length, self.rope_theta, self.rms_norm_eps = max_sequence_length, rope_theta, rms_norm_eps
        self.weights_layout = weights_layout
        published_rows = embedding_size or vocab_size
        # Embedding and output rows (padding rows are never returned).
        self.vocab_rows = vocab_rows if weights_layout == "proseco-pretrain" and vocab_rows else published_rows
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.weight * normed


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device):
    """cos, sin [1, L, 1, head_dim] (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.float()
        half = xf.shape[-1] // 2
        return (xf * cos + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * sin).to(x.dtype)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hidden = config.d_model, config.mlp_hidden_size
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads or config.n_heads
        kv = self.n_kv_heads * (d // config.n_heads)
        self.attn_norm, self.ff_norm = RMSNorm(d, config.rms_norm_eps), RMSNorm(d, config.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False), nn.Linear(d, kv, bias=False),
                                                 nn.Linear(d, kv, bias=False))
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, length, _ = x.shape
        h = self.attn_norm(x)
        q = rotate(self.q_proj(h).view(batch, length, self.n_heads, -1), *rope).transpose(1, 2)
        k = rotate(self.k_proj(h).view(batch, length, self.n_kv_heads, -1), *rope).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, -1).transpose(1, 2)
        if self.n_kv_heads != self.n_heads:  # query head i reads key/value head i // group
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, length, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_rows, config.d_model),
            "blocks": nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
            "ff_out": nn.Linear(config.d_model, config.vocab_rows, bias=False),
        })

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.transformer.wte(input_ids)
        rope = rotary_tables(x.shape[1], self.config.d_model // self.config.n_heads, self.config.rope_theta, x.device)
        hidden = [x]
        for block in self.transformer.blocks:
            x = block(x, rope)
            hidden.append(x)
        x = self.transformer.ln_f(x)
        return self.transformer.ff_out(x), hidden


class LLaDAModelLM(PreTrainedModel):
    """input_ids [B, L] -> CausalLMOutput(logits [B, L, vocab_size]), as the published class."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """For a model built without weights (from_config): normal(0, 0.02) projections and
        embedding, RMSNorm weights at one; only torch.nn.init functions write here (transformers
        guards them while loading a folder, for the tensors it holds)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.model.transformer.ff_out

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool | None = None, **kwargs) -> CausalLMOutput:
        if kwargs.get("attention_mask") is not None:
            raise ValueError("attention_mask is not supported: LLaDA attends over the whole sequence")
        logits, hidden = self.model(input_ids)
        logits = logits[..., : self.config.vocab_size]  # padding rows (proseco-pretrain layout) are never predicted
        return CausalLMOutput(logits=logits, hidden_states=tuple(hidden) if output_hidden_states else None)
