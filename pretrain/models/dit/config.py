"""The `model:` section of a DiT run (importable without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.models import ModelConfig


@dataclass
class DiTConfig(ModelConfig):
    """The DiT backbone (MDLM/ProSeCo layout: adaLN-Zero blocks, rotary attention)."""

    d_model: int = 256
    """Width of the residual stream (768 in the paper's OWT model)."""
    n_layers: int = 4
    """Number of transformer blocks (12 in the paper's OWT model)."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by it (head size 64 in the paper)."""
    cond_dim: int = 128
    """Width of the conditioning vector that drives the adaLN modulation."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of d_model."""
    dropout: float = 0.0
    """Residual dropout on the attention and MLP branches (0.1 in the paper's runs)."""
    time_conditioning: bool = False
    """Feed the noise level to the network. Off in every ProSeCo run: sigma is zeroed."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding."""
    attention: Literal["auto", "sdpa", "flash"] = "auto"
    """Attention kernel: flash-attn when importable and on CUDA (auto), else PyTorch SDPA."""

    @property
    def num_layers(self) -> int:
        return self.n_layers

    def problems(self) -> list[str]:
        found = [f"model.{name} must be positive" for name in ("d_model", "n_layers", "n_heads", "cond_dim",
                                                                "mlp_ratio") if getattr(self, name) <= 0]
        if self.n_heads > 0 and self.d_model % self.n_heads:
            found.append(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; pick "
                         "n_heads dividing d_model")
        if self.n_heads > 0 and (self.d_model // self.n_heads) % 2:
            found.append("model.d_model / model.n_heads must be even for rotary embeddings; change n_heads or "
                         "d_model")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"model.dropout={self.dropout} must be in [0, 1)")
        return found

    def layout_problems(self, tp: int) -> list[str]:
        """parallelize.py splits heads, the MLP and the adaLN modulation evenly over tp."""
        if tp <= 1:
            return []
        found = []
        if self.n_heads % tp:
            found.append(f"model.n_heads={self.n_heads} is not divisible by parallel.tp={tp}; choose tp dividing "
                         "the number of heads")
        if (self.mlp_ratio * self.d_model) % tp:
            found.append(f"the MLP width {self.mlp_ratio * self.d_model} is not divisible by parallel.tp={tp}")
        if (6 * self.d_model) % tp:
            found.append("the adaLN modulation width 6 * model.d_model is not divisible by parallel.tp")
        return found


CONFIG = DiTConfig
