"""The `model:` section of a LLaDA run and its size from the config alone (importable without torch).

Field names are those of LLaDA's published config.json (GSAI-ML/LLaDA-8B-Base: an OLMo-style
ModelConfig) where it has the field; `LLADA_8B` below is that config's architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.models import ModelConfig, head_problems, size_problems

# GSAI-ML/LLaDA-8B-Base and -Instruct (the same architecture): the config.json fields this family
# reads (checkpoint_names.model_fields), as published.
LLADA_8B = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
            "vocab_size": 126464, "embedding_size": 126464, "max_sequence_length": 4096, "rope_theta": 500000.0,
            "rms_norm_eps": 1e-05, "weight_tying": False, "include_bias": False, "block_type": "llama",
            "layer_norm_type": "rms", "activation_type": "silu", "rope": True, "alibi": False}


@dataclass
class LLaDAConfig(ModelConfig):
    """The LLaDA transformer: pre-norm blocks of RMSNorm, rotary attention over the whole sequence
    (no causal mask), a SwiGLU MLP; no noise-level input; untied embedding and output layer."""

    family: str = "llada"
    """Model family: a subpackage of pretrain/models (llada here)."""
    d_model: int = field(default=256, metadata={"ge": 1})
    """Width of the residual stream (4096 in LLaDA 8B)."""
    n_layers: int = field(default=4, metadata={"ge": 1})
    """Number of transformer blocks (32 in LLaDA 8B)."""
    n_heads: int = field(default=4, metadata={"ge": 1})
    """Query heads; d_model must be divisible by it, into an even head size (32 heads of 128 in LLaDA 8B)."""
    n_kv_heads: int | None = field(default=None, metadata={"ge": 1})
    """Key/value heads (grouped-query attention); None: n_heads, as in LLaDA 8B. Must divide n_heads."""
    mlp_hidden_size: int = field(default=768, metadata={"ge": 1})
    """Hidden width of the SwiGLU MLP: of the gate (ff_proj) and up (up_proj) projections (12288 in LLaDA 8B)."""
    rope_theta: float = field(default=500000.0, metadata={"gt": 1})
    """Base of the rotary position embedding (500000 in LLaDA 8B; above 1, so the frequencies fall)."""
    rms_norm_eps: float = field(default=1e-5, metadata={"gt": 0, "lt": 1})
    """Epsilon added to the mean square inside every RMSNorm (1e-5 in LLaDA 8B)."""
    init_std: float = field(default=0.02, metadata={"gt": 0, "lt": 1})
    """Standard deviation of the normal initialisation of the embedding and every projection (RMSNorm
    weights start at one). Only a fresh model uses it; LLaDA's weights come with model.init_from."""

    @property
    def num_layers(self) -> int:
        return self.n_layers

    @property
    def time_conditioning(self) -> bool:
        """Never: LLaDA has no noise-level input (the sampler reads this of every family)."""
        return False

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when it is None."""
        return self.n_kv_heads or self.n_heads

    def problems(self) -> list[str]:
        """Head sizes rotary attention can use, kv heads that group the query heads, and sizes no
        machine holds."""
        found = head_problems(self.d_model, self.n_heads)
        if self.n_heads > 0 and self.kv_heads > 0 and self.n_heads % self.kv_heads:
            found.append(f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}; pick "
                         "a divisor (each key/value head serves a group of query heads), or null for n_heads")
        activations = sequence_activations(self, self.seq_len) if self.seq_len is not None else 0
        return found + size_problems(num_parameters(self, self.min_vocab_rows()), activations, self.seq_len,
                                     "model.d_model, model.n_layers, model.mlp_hidden_size or model.vocab_size")

    def layout_problems(self, tp: int) -> list[str]:
        """parallelize.py splits the query heads, the key/value heads and the MLP evenly over tp."""
        if tp <= 1:
            return []
        found = []
        if self.n_heads % tp:
            found.append(f"model.n_heads={self.n_heads} is not divisible by parallel.tp={tp}; choose tp dividing "
                         "the number of heads")
        if self.kv_heads % tp:
            found.append(f"model.n_kv_heads={self.kv_heads} is not divisible by parallel.tp={tp}; choose tp "
                         "dividing the number of key/value heads")
        if self.mlp_hidden_size % tp:
            found.append(f"model.mlp_hidden_size={self.mlp_hidden_size} is not divisible by parallel.tp={tp}")
        return found

    def kernels(self, device: str, precision: str) -> str:
        """model.py's attention: PyTorch SDPA (whose CUDA path has a FlashAttention kernel)."""
        return f"attention: PyTorch SDPA on {device}"


def num_parameters(cfg: LLaDAConfig, vocab_rows: int) -> int:
    """Parameters of the LLaDA model.py builds with `vocab_rows` embedding and output rows (checked
    against the built model in tests/test_llada.py); from the config alone, in exact integers."""
    d, hidden = cfg.d_model, cfg.mlp_hidden_size
    kv = cfg.kv_heads * (d // max(cfg.n_heads, 1))
    block = (2 * d                      # attn_norm, ff_norm
             + 2 * d * d + 2 * d * kv   # q, attn_out; k, v (no bias)
             + 3 * d * hidden)          # ff_proj, up_proj, ff_out
    return 2 * vocab_rows * d + cfg.n_layers * block + d  # wte, ff_out; ln_f


def sequence_activations(cfg: LLaDAConfig, seq_len: int) -> int:
    """Activations one sequence keeps for backward at the least (activation checkpointing on): the
    input of every block and the logits."""
    return seq_len * (cfg.n_layers * cfg.d_model + cfg.min_vocab_rows())


CONFIG = LLaDAConfig
