"""What the memory plan needs of each model family, from its config alone: where its parameters
sit (blocks, embedding, output layer) and what one block keeps for backward per token.

The per-block counts are the tensors autograd saves in the family's model.py, one by one (listed
beside each formula; found by walking the saved tensors of a block's graph), in three kinds:
- `stream`: the residual stream and the norms computed in fp32 (4 bytes whatever the precision),
  whole on every tensor-parallel rank (split along the sequence with sequence parallelism);
- `replicated`: in the activation dtype (fp32, or bf16 under autocast), whole on every
  tensor-parallel rank: the inputs of column-wise layers and the outputs of row-wise ones;
- `sharded`: in the activation dtype, split over tensor-parallel ranks: heads, q/k/v, the MLP's
  hidden features.
Attention is SDPA's flash kernel (CPU and CUDA) or flash-attn: q, k, v, the output and a
log-sum-exp per head and token are saved, never the L x L scores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pretrain.errors import ConfigError


@dataclass(frozen=True)
class BlockActivations:
    """Elements one block saves for backward per token, by kind (see the module docstring)."""

    stream: float
    replicated: float
    sharded: float
    dropout_masks: int = 0
    """Dropout masks per token of d elements: bool on CUDA (1 byte), the activation dtype on CPU,
    where dropout multiplies by a noise tensor."""
    heads: int = 0
    """Attention heads: one fp32 log-sum-exp per head and token (split over tensor-parallel ranks)."""
    backward_extra: float = 0.0
    """Elements of d per token of the gradients that live at once while one block runs backward (the
    gradient of its hidden features and two of the stream), activation dtype, sharded."""

    def bytes_per_token(self, d_model: int, act_bytes: int, tp: int, sequence_parallel: bool,
                        mask_bytes: int) -> float:
        """Bytes one block saves per token on one tensor-parallel rank."""
        stream_split = tp if sequence_parallel else 1
        return d_model * (4 * self.stream / stream_split + act_bytes * self.replicated
                          + act_bytes * self.sharded / tp + mask_bytes * self.dropout_masks) + 4 * self.heads / tp


@dataclass(frozen=True)
class FamilyPlan:
    """A model's parameters by place and its per-block activations, for one config."""

    d_model: int
    num_layers: int
    vocab_rows: int
    block_parameters: int
    embedding_parameters: int
    """On the first pipeline stage: the input embedding (split over tp by vocabulary)."""
    head_parameters: int
    """On the last pipeline stage: the output layer (split over tp by vocabulary)."""
    other_parameters: int
    """Everything else (conditioning, final norm and modulation): small, counted on the first and
    the last stage, replicated over tp."""
    block: BlockActivations
    features_per_token: float
    """fp32 elements of d per token the final layer keeps for backward (its norm, the features)."""

    @property
    def total_parameters(self) -> int:
        return (self.num_layers * self.block_parameters + self.embedding_parameters + self.head_parameters
                + self.other_parameters)


def _dit(cfg, rows: int) -> FamilyPlan:
    from pretrain.models.dit.config import num_parameters

    d, r = cfg.d_model, cfg.mlp_ratio
    # Saved per block (model.py, DiTBlock.forward), in units of d per token:
    #   stream (fp32): the block input, norm1's output and its weighted output, the residual after
    #     attention, norm2's output and its weighted output                                     6
    #   replicated: the modulated input of attn_qkv (bf16: its cast), attn_out's output (kept by
    #     the gate's product), the modulated input of the MLP, the MLP's output                 4
    #   sharded: the fused q/k/v (v keeps its storage), rotated q and k, the attention output
    #     (attn_out's input), the MLP's hidden pre- and post-GELU                            6 + 2r
    block = BlockActivations(stream=6, replicated=4, sharded=6 + 2 * r, dropout_masks=2 if cfg.dropout > 0 else 0,
                             heads=cfg.n_heads, backward_extra=r + 2)
    return _family_plan(cfg, rows, num_parameters, block, embedding=rows * d, head=rows * d + rows, features=3)


def _llada(cfg, rows: int) -> FamilyPlan:
    from pretrain.models.llada.config import num_parameters

    d, hidden = cfg.d_model, cfg.mlp_hidden_size
    kv = cfg.kv_heads * (d // cfg.n_heads) / d
    # Saved per block (model.py, LLaDABlock.forward), in units of d per token:
    #   stream (fp32): the block input, attn_norm's normalised input, the residual after
    #     attention, ff_norm's normalised input                                                4
    #   replicated: the normed inputs of q/k/v and of ff_proj/up_proj (fp32: one each; under
    #     autocast every projection keeps its own bf16 cast: 3 and 2), see `replicated` below
    #   sharded: rotated q, rotated k and v (kv heads), the attention output, and the SwiGLU's
    #     ff_proj output, its silu, up_proj's output and their product (4 x hidden)
    sharded = 2 + 2 * kv + 4 * hidden / d
    fp32 = BlockActivations(stream=4, replicated=2, sharded=sharded, heads=cfg.n_heads,
                            backward_extra=2 * hidden / d + 2)
    plan = _family_plan(cfg, rows, num_parameters, fp32, embedding=rows * d, head=rows * d, features=2)
    return plan


def _family_plan(cfg, rows: int, count, block: BlockActivations, embedding: int, head: int,
                 features: float) -> FamilyPlan:
    one = count(dataclasses.replace(cfg, n_layers=1), rows)
    none = count(dataclasses.replace(cfg, n_layers=0), rows)
    return FamilyPlan(d_model=cfg.d_model, num_layers=cfg.num_layers, vocab_rows=rows, block_parameters=one - none,
                      embedding_parameters=embedding, head_parameters=head,
                      other_parameters=none - embedding - head, block=block, features_per_token=features)


PLANS = {"dit": _dit, "llada": _llada}


def family_plan(cfg, rows: int, precision: str) -> FamilyPlan:
    """The plan's view of the model of `cfg` (its `model:` section) with `rows` vocabulary rows."""
    if cfg.family not in PLANS:
        raise ConfigError(f"proseco plan has no memory formula for model.family={cfg.family!r} (it knows "
                          f"{', '.join(sorted(PLANS))}); add one to pretrain/plan/families.py")
    plan = PLANS[cfg.family](cfg, rows)
    if cfg.family == "llada" and precision == "bf16":
        # Under autocast each of q/k/v and ff_proj/up_proj casts the shared normed input itself.
        plan = dataclasses.replace(plan, block=dataclasses.replace(plan.block, replicated=3 + 2))
    return plan
