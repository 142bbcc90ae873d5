"""The DiT backbone of MDLM and ProSeCo, as a plain nn.Module.

adaLN-Zero pre-LN blocks conditioned on a (by default constant) noise embedding, rotary
attention over the whole sequence (bidirectional), weight-only LayerNorm in fp32, GELU(tanh) MLP,
untied input embedding and output layer. Module names follow the official Hugging Face layout
(kuleshov-group/proseco-owt, mdlm-owt), so its checkpoints map onto this model by renaming,
except that the rows of the fused `attn_qkv` are ordered head-major ([H, 3, head_dim]: each head's
q, k and v rows together) where upstream has [3, H, head_dim]: tensor parallelism then shards the
projection into contiguous row blocks that hold whole heads with their q, k and v, and one GEMM
still computes all three (see checkpoint_names.py beside this file for the row permutation).

Parallelism is applied from outside (parallelize.py beside this file): nothing here knows about
meshes. The blocks
live in a ModuleDict keyed "0".."n-1" so that pipeline stages, which delete the blocks they do not
own, keep the same parameter names as the full model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import ModelShape
from pretrain.models.dit.config import DiTConfig
from pretrain.models.init import Init, build_then_materialise, keyed_init
from pretrain.models.rotary import Rotary, apply_rotary

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal features of sigma, as upstream

def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


# Resolved once, at import: an import inside the forward would break a torch.compile graph
# (parallel.compile) at every attention call.
FLASH_ATTN_FUNC = _flash_attn_func()


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in fp32 whatever the autocast dtype (as upstream)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            # The weight inside the norm: one kernel (and its backward) instead of a norm and a
            # multiply. fp32 either way: a bf16 weight (FSDP's param_dtype) is promoted, as before.
            return F.layer_norm(x.float(), [self.dim], self.weight.float())


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, as one kernel over x."""
    return torch.addcmul(shift, x, 1 + scale)


class TimestepEmbedder(nn.Module):
    """sigma -> conditioning vector: sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    @staticmethod
    def frequency_embedding(sigma: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequency_embedding(sigma))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Bidirectional attention, [B, L, H, hd] in and out. flash-attn where it can run, else SDPA."""
    flash = FLASH_ATTN_FUNC if backend in ("auto", "flash") else None
    flash_ok = flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash" and not flash_ok:
        raise RuntimeError("model.attention=flash needs flash-attn installed, CUDA tensors and bf16/fp16 "
                           "(train.precision=bf16); use model.attention=auto to fall back to SDPA")
    if flash_ok:
        return flash(q, k, v, dropout_p=0.0, causal=False)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False)
    return out.transpose(1, 2)


class LabelEmbedder(nn.Module):
    """Class label -> a vector added to the conditioning c (classifier-free guidance), as the
    official DiT's `cond_map`: num_classes + 1 rows, the last one the null class that label
    dropout trains as the unconditional model."""

    def __init__(self, num_classes: int, cond_dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, cond_dim)
        self.null_class = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """x + gate * Dropout(Attn(modulate(LN(x)))), then the same with the MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.d_model
        self.head_dim = d // cfg.n_heads
        self.attention_backend = cfg.attention
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)  # rows head-major: [H, 3, head_dim]
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * d, d))
        self.dropout = nn.Dropout(cfg.dropout)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)

    def _qkv(self, h: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h -> q and k rotated, and v, each [B, L, H, hd], from one head-major projection
        [B, L, H*3*hd]. Shapes come from the projection itself: under tensor parallelism it holds
        this rank's heads only, under sequence parallelism the whole sequence while h holds a slice
        of it (so do the rotary tables)."""
        projected = self.attn_qkv(h)
        q, k, v = projected.view(*projected.shape[:2], -1, 3, self.head_dim).unbind(dim=3)
        tables = rotary(q.shape[1], q.device)
        return apply_rotary(q, *tables), apply_rotary(k, *tables), v

    def forward(self, x: torch.Tensor, c: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        modulation = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        q, k, v = self._qkv(modulate(self.norm1(x), shift_msa, scale_msa), rotary)
        attn = attention(q, k, v, self.attention_backend)
        # x + gate * branch, one kernel each (addcmul).
        x = torch.addcmul(x, gate_msa, self.dropout(self.attn_out(attn.flatten(2))))
        return torch.addcmul(x, gate_mlp, self.dropout(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig, vocab_size: int):
        super().__init__()
        self.norm_final = LayerNorm(cfg.d_model)
        self.linear = nn.Linear(cfg.d_model, vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.d_model)

    def forward(self, x: torch.Tensor, c: torch.Tensor, features: bool = False) -> torch.Tensor:
        """Logits [B, L, V]; with `features`, the input of the output projection `linear` instead
        ([B, L, d], or this rank's slice of the sequence under sequence parallelism)."""
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        h = modulate(self.norm_final(x), shift, scale)
        return h if features else self.linear(h)


class DiT(nn.Module):
    """tokens [B, L] (+ sigma [B]) -> logits [B, L, vocab_size] (raw: no mask suppression, no SUBS).

    With `emit_features` set, the model returns the input of its output projection instead of
    logits; a loss that applies `output_head` to a few tokens at a time then never holds the
    B x L x V logits (pretrain/step.py). The sampler and every other caller get logits.
    """

    emit_features = False

    def __init__(self, cfg: DiTConfig, shape: ModelShape, device: torch.device | str | None = None, seed: int = 0):
        """Built on the meta device; unless `device` is "meta", materialised on `device` (default
        torch's default device) and initialised keyed by `seed` (pretrain/models/init.py)."""
        super().__init__()
        self.cfg, self.shape = cfg, shape
        build_then_materialise(self, lambda: self._build(cfg, shape), device, seed)

    def _build(self, cfg: DiTConfig, shape: ModelShape) -> None:
        self.vocab_embed = nn.Embedding(shape.vocab_size, cfg.d_model)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        # Official name and layout (backbone.cond_map.embedding_table.weight): exports map it by name.
        self.cond_map = LabelEmbedder(cfg.num_classes, cfg.cond_dim) if cfg.num_classes else None
        self.rotary_emb = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.blocks = nn.ModuleDict({str(i): DiTBlock(cfg) for i in range(cfg.n_layers)})
        self.output_layer = FinalLayer(cfg, shape.vocab_size)

    def init_weights(self, seed: int = 0) -> None:
        """Upstream initialisation, keyed by (seed, parameter name, position): this model's
        parameters, whole, a pipeline stage's or this rank's shards of them (init_rule)."""
        keyed_init(self, seed, self.init_rule)

    @staticmethod
    def init_rule(module_name: str, module: nn.Module, param_name: str) -> Init:
        """Upstream's distributions: every adaLN modulation and the output projection zero (the
        blocks start as the identity), embeddings kaiming-uniform (a=sqrt(5): U(+-1/sqrt(d))), other
        Linear layers PyTorch's default (weight and bias U(+-1/sqrt(fan_in))), norms one. By module
        type, so a module added later (an embedding, a Linear) is covered; an unknown one is an error."""
        if isinstance(module, nn.Linear):
            if module_name.endswith("adaLN_modulation") or module_name == "output_layer.linear":
                return Init.constant(0.0)
            return Init.uniform(1 / math.sqrt(module.in_features))
        if isinstance(module, nn.Embedding):
            return Init.uniform(1 / math.sqrt(module.embedding_dim))
        if isinstance(module, LayerNorm):
            return Init.constant(1.0)
        raise TypeError(f"DiT.init_rule has no initialisation for {module_name}.{param_name} "
                        f"({type(module).__name__}); add one")

    @property
    def output_head(self) -> nn.Linear | None:
        """The projection features -> logits (None on a pipeline stage without the output layer)."""
        return None if self.output_layer is None else self.output_layer.linear

    def conditioning(self, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The vector c that drives every adaLN modulation. Without time conditioning sigma is zeroed
        (the network never sees t, as in every ProSeCo run) and c is a learned constant. A model
        with class labels adds SiLU(label embedding), as the official DiT does; without `labels`
        it is the unconditional model (the null class)."""
        if not self.cfg.time_conditioning:
            sigma = torch.zeros_like(sigma)
        c = F.silu(self.sigma_map(sigma))
        if self.cond_map is None:
            if labels is not None:
                raise ValueError("class labels were given to a DiT without a label embedding (model.num_classes=0)")
            return c
        if labels is None:
            labels = torch.full((c.shape[0],), self.cond_map.null_class, dtype=torch.long, device=c.device)
        return c + F.silu(self.cond_map(labels))

    def forward(self, tokens: torch.Tensor, sigma: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """tokens [B, L], sigma [B] and class labels [B] (with model.num_classes; None: the null
        class) -> logits [B, L, V] (features [B, L, d] with emit_features).

        A pipeline stage holds only some of the modules: without the embedding it takes the
        residual stream and the conditioning vector (x, c) instead (c already holds the labels),
        and without the output layer it returns (x, c) for the next stage.
        """
        if self.vocab_embed is not None:
            if sigma is None:
                sigma = torch.zeros(tokens.shape[0], device=tokens.device)
            x, c = self.vocab_embed(tokens), self.conditioning(sigma, labels)
        else:
            x, c = tokens, sigma
        for block in self.blocks.values():
            x = block(x, c, self.rotary_emb)
        if self.output_layer is None:
            return x, c
        return self.output_layer(x, c, features=self.emit_features)


def forward_flops_per_sequence(cfg: DiTConfig, shape: ModelShape, seq_len: int | None = None) -> int:
    """Forward FLOPs of one sequence (multiply-add = 2 FLOPs), bidirectional attention included.

    A training step costs 3x the forward (backward = 2x). Checked against torch's FlopCounterMode
    in tests/test_model.py.
    """
    length = seq_len or shape.seq_len
    d, cond, hidden = cfg.d_model, cfg.cond_dim, cfg.mlp_ratio * cfg.d_model
    per_token_block = 2 * (4 * d * d + 2 * d * hidden) + 2 * 2 * length * d  # projections + MLP + QK^T, AV
    per_sequence_block = 2 * cond * 6 * d  # adaLN modulation, once per sequence
    per_token_head = 2 * d * shape.vocab_size
    per_sequence_cond = 2 * (FREQUENCY_EMBEDDING_SIZE * cond + cond * cond) + 2 * cond * 2 * d
    return (cfg.n_layers * (per_token_block * length + per_sequence_block)
            + per_token_head * length + per_sequence_cond)
