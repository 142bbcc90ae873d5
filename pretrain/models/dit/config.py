"""The `model:` section of a DiT run and its size from the config alone (importable without torch)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from pretrain.models import ModelConfig, head_problems, size_problems

# model.py's FREQUENCY_EMBEDDING_SIZE (model.py needs torch); the parameter-count test keeps them equal.
FREQUENCY_FEATURES = 256


@dataclass
class DiTConfig(ModelConfig):
    """The DiT backbone (MDLM/ProSeCo layout: adaLN-Zero blocks, rotary attention)."""

    d_model: int = field(default=256, metadata={"ge": 1})
    """Width of the residual stream (768 in the paper's OWT model)."""
    n_layers: int = field(default=4, metadata={"ge": 1})
    """Number of transformer blocks (12 in the paper's OWT model)."""
    n_heads: int = field(default=4, metadata={"ge": 1})
    """Attention heads; d_model must be divisible by it (head size 64 in the paper)."""
    cond_dim: int = field(default=128, metadata={"ge": 1})
    """Width of the conditioning vector that drives the adaLN modulation."""
    mlp_ratio: int = field(default=4, metadata={"ge": 1})
    """MLP hidden width as a multiple of d_model."""
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """Residual dropout on the attention and MLP branches (0.1 in the paper's runs)."""
    time_conditioning: bool = False
    """Feed the noise level to the network. Off in every ProSeCo run: sigma is zeroed."""
    rope_base: float = field(default=10000.0, metadata={"gt": 1})
    """Base of the rotary position embedding (above 1, so that the frequencies base^(-2i/d) fall)."""
    attention: Literal["auto", "sdpa", "flash"] = "auto"
    """Attention kernel: flash-attn when importable and on CUDA (auto), else PyTorch SDPA."""
    num_classes: int | None = field(default=None, metadata={"ge": 0})
    """Classes of the conditioning labels (classifier-free guidance): the model adds a label
    embedding of num_classes + 1 rows (the last the null class) to c. None takes it from the label
    set named by data.labels (0 without one: no label embedding)."""

    @property
    def num_layers(self) -> int:
        return self.n_layers

    def problems(self) -> list[str]:
        """Head sizes rotary attention can use, and sizes no machine holds."""
        activations = sequence_activations(self, self.seq_len) if self.seq_len is not None else 0
        return head_problems(self.d_model, self.n_heads) + size_problems(
            num_parameters(self, self.min_vocab_rows()), activations, self.seq_len,
            "model.d_model, model.n_layers, model.mlp_ratio, model.cond_dim or model.vocab_size")

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

    def kernels(self, device: str, precision: str) -> str:
        """model.py's choice: flash-attn where asked for or allowed (auto) and able to run (CUDA,
        bf16, the package importable), else PyTorch SDPA (whose CUDA path has a FlashAttention
        kernel of its own)."""
        flash = (self.attention != "sdpa" and device == "cuda" and precision == "bf16"
                 and importlib.util.find_spec("flash_attn") is not None)
        return "attention: flash-attn" if flash else f"attention: PyTorch SDPA on {device}"

    def kernel_problems(self, device: str, precision: str) -> list[str]:
        """model.attention=flash runs only where model.py's flash-attn path can: CUDA, bf16, the package."""
        if self.attention != "flash":
            return []
        found = []
        if device != "cuda":
            found.append("model.attention=flash needs CUDA, and this run is on the CPU; use model.attention=auto "
                         "(flash-attn where it can run, else SDPA) or model.attention=sdpa")
        if precision != "bf16":
            found.append(f"model.attention=flash needs train.precision=bf16 (flash-attn has no {precision} kernel); "
                         "set train.precision=bf16 or use model.attention=auto")
        try:  # the import model.py's flash path makes
            import flash_attn  # noqa: F401
        except ImportError:
            found.append("model.attention=flash needs the flash-attn package, which is not importable here; "
                         "install it or use model.attention=auto")
        return found


def num_parameters(cfg: DiTConfig, vocab_rows: int) -> int:
    """Parameters of the DiT built by model.py with `vocab_rows` embedding and output rows (checked
    against the built model in tests/test_config.py); from the config alone, in exact integers."""
    d, cond, hidden = cfg.d_model, cfg.cond_dim, cfg.mlp_ratio * cfg.d_model
    block = (2 * d                                # norm1, norm2
             + 4 * d * d                          # q, k, v, out projections (no bias)
             + d * hidden + hidden + hidden * d + d  # MLP
             + cond * 6 * d + 6 * d)              # adaLN modulation
    conditioning = FREQUENCY_FEATURES * cond + cond + cond * cond + cond
    final = d + d * vocab_rows + vocab_rows + cond * 2 * d + 2 * d
    labels = (cfg.num_classes + 1) * cond if cfg.num_classes else 0  # the label embedding, null class included
    return vocab_rows * d + conditioning + labels + cfg.n_layers * block + final


def sequence_activations(cfg: DiTConfig, seq_len: int) -> int:
    """Activations one sequence keeps for backward at the least (activation checkpointing on): the
    input of every block and the logits."""
    return seq_len * (cfg.n_layers * cfg.d_model + cfg.min_vocab_rows())


CONFIG = DiTConfig
