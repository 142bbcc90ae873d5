"""The LLaDA transformer (GSAI-ML/LLaDA-8B), as a plain nn.Module.

LLaMA-style pre-norm blocks: RMSNorm (normalised in fp32), attention with rotary positions
(rotate-half layout, rotated in fp32) over the whole sequence, no causal mask, optional grouped-
query attention; a SwiGLU MLP (silu(ff_proj(h)) * up_proj(h) -> ff_out); no biases, no dropout and
no noise-level input (sigma is accepted and ignored: the network never sees t). A final RMSNorm
and an untied output layer. Module names are those of the published layout (LLaDAModel's
`transformer.*`: wte, blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj,
up_proj, ff_out}, ln_f, ff_out), so checkpoints map onto this model by a prefix alone
(checkpoint_names.py beside this file). q, k and v stay three projections, as published: each is
split by whole heads under tensor parallelism.

Parallelism is applied from outside (parallelize.py): nothing here knows about meshes. The blocks
live in a ModuleDict keyed "0".."n-1" so that pipeline stages, which delete the blocks they do not
own, keep the same parameter names as the full model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import ModelShape
from pretrain.models.init import Init, build_then_materialise, keyed_init
from pretrain.models.llada.config import LLaDAConfig
from pretrain.models.rotary import Rotary, apply_rotary


class RMSNorm(nn.Module):
    """x / rms(x) in fp32 whatever the autocast dtype, back in x's dtype, times a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.weight * normed


class LLaDABlock(nn.Module):
    """x + attn_out(Attn(attn_norm(x))), then x + ff_out(silu(ff_proj(h)) * up_proj(h)), h = ff_norm(x)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, hidden = cfg.d_model, cfg.mlp_hidden_size
        self.head_dim = d // cfg.n_heads
        kv = cfg.kv_heads * self.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, hidden, bias=False)  # the gate: silu(ff_proj(h))
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, d, bias=False)

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        """[B, L, H*hd] -> [B, L, H, hd]. Shapes come from the projection itself: under tensor
        parallelism it holds this rank's heads only, under sequence parallelism the whole sequence
        while x holds a slice of it."""
        return projected.view(*projected.shape[:2], -1, self.head_dim)

    def forward(self, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        h = self.attn_norm(x)
        q, k, v = self._heads(self.q_proj(h)), self._heads(self.k_proj(h)), self._heads(self.v_proj(h))
        rope = rotary(q.shape[1], q.device)  # the whole sequence, even when x holds a slice of it
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # Query head i reads key/value head i // (H / H_kv), as repeat_interleave (the published code).
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=False, enable_gqa=k.shape[2] != q.shape[2])
        x = x + self.attn_out(attn.transpose(1, 2).flatten(2))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDA(nn.Module):
    """tokens [B, L] (+ sigma [B], ignored) -> logits [B, L, vocab_rows] (raw: no mask suppression).

    With `emit_features` set, the model returns the input of its output layer (the final norm's
    output) instead of logits; the chunked loss applies `output_head` to a few tokens at a time
    (pretrain/step.py). The sampler and every other caller get logits.
    """

    emit_features = False

    def __init__(self, cfg: LLaDAConfig, shape: ModelShape, device: torch.device | str | None = None,
                 seed: int = 0):
        """Built on the meta device; unless `device` is "meta", materialised on `device` (default
        torch's default device) and initialised keyed by `seed` (pretrain/models/init.py)."""
        super().__init__()
        self.cfg, self.shape = cfg, shape
        build_then_materialise(self, lambda: self._build(cfg, shape), device, seed)

    def _build(self, cfg: LLaDAConfig, shape: ModelShape) -> None:
        self.wte = nn.Embedding(shape.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.blocks = nn.ModuleDict({str(i): LLaDABlock(cfg) for i in range(cfg.n_layers)})
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = nn.Linear(cfg.d_model, shape.vocab_size, bias=False)

    def init_weights(self, seed: int = 0) -> None:
        """Normal(0, model.init_std) embedding and projections, RMSNorm weights at one, keyed by
        (seed, parameter name, position): whole, a pipeline stage's or this rank's shards."""
        keyed_init(self, seed, self.init_rule)

    def init_rule(self, module_name: str, module: nn.Module, param_name: str) -> Init:
        """By module type, so a module added later is covered; an unknown one is an error."""
        if isinstance(module, (nn.Linear, nn.Embedding)) and param_name == "weight":
            return Init.normal(self.cfg.init_std)
        if isinstance(module, RMSNorm):
            return Init.constant(1.0)
        raise TypeError(f"LLaDA.init_rule has no initialisation for {module_name}.{param_name} "
                        f"({type(module).__name__}); add one")

    @property
    def output_head(self) -> nn.Linear | None:
        """The projection features -> logits (None on a pipeline stage without the output layer)."""
        return self.ff_out

    def forward(self, tokens: torch.Tensor, sigma: torch.Tensor | None = None):
        """tokens [B, L] (sigma [B] ignored) -> logits [B, L, V] (features [B, L, d] with emit_features).

        A pipeline stage holds only some of the modules: without the embedding it takes the
        residual stream [B, L, d] in place of the tokens, and without the output layer it returns
        the residual stream for the next stage.
        """
        x = self.wte(tokens) if self.wte is not None else tokens
        for block in self.blocks.values():
            x = block(x, self.rotary)
        if self.ff_out is None:
            return x
        x = self.ln_f(x)
        return x if self.emit_features else self.ff_out(x)


def forward_flops_per_sequence(cfg: LLaDAConfig, shape: ModelShape, seq_len: int | None = None) -> int:
    """Forward FLOPs of one sequence (multiply-add = 2 FLOPs), bidirectional attention included.

    A training step costs 3x the forward (backward = 2x). Checked against torch's FlopCounterMode
    in tests/test_llada.py.
    """
    length = seq_len or shape.seq_len
    d, hidden = cfg.d_model, cfg.mlp_hidden_size
    kv = cfg.kv_heads * (d // cfg.n_heads)
    projections = 2 * (2 * d * d + 2 * d * kv + 3 * d * hidden)  # q, attn_out, k, v, SwiGLU MLP
    attention = 2 * 2 * length * d  # QK^T and AV over the whole sequence, all query heads
    per_token_head = 2 * d * shape.vocab_size
    return length * (cfg.n_layers * (projections + attention) + per_token_head)
