"""The DiT backbone: layout, initialisation, attention backends, FLOPs formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import pretrain.models.dit.model as model_module
from pretrain.models import ModelShape, count_parameters
from pretrain.models.dit.config import DiTConfig as ModelConfig
from pretrain.models.dit.model import DiT, DiTBlock, forward_flops_per_sequence

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=4, cond_dim=16)
SHAPE = ModelShape(vocab_size=40, seq_len=12)


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (the zero-initialised layers would hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def test_untrained_block_is_identity():
    block = DiTBlock(TINY)
    torch.nn.init.zeros_(block.adaLN_modulation.weight)
    torch.nn.init.zeros_(block.adaLN_modulation.bias)
    model = DiT(TINY, SHAPE)  # init_weights zeroes every adaLN layer
    x = torch.randn(2, SHAPE.seq_len, TINY.d_model)
    c = torch.randn(2, TINY.cond_dim)
    for b in [block, *model.blocks.values()]:
        assert torch.equal(b(x, c, model.rotary_emb), x)


def test_untrained_model_predicts_uniform():
    model = DiT(TINY, SHAPE)
    logits = model(torch.randint(0, 40, (2, 12)))
    assert logits.shape == (2, 12, 40) and torch.all(logits == 0)


def test_official_parameter_layout():
    """Names and shapes follow kuleshov-group/proseco-owt (qkv split in three), and the
    parameter count matches the paper's 169,627,218 for the OWT configuration."""
    names = [n for n, _ in DiT(TINY, SHAPE).named_parameters()]
    assert names[:5] == ["vocab_embed.weight", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias",
                         "sigma_map.mlp.2.weight", "sigma_map.mlp.2.bias"]
    assert names[5:17] == [f"blocks.0.{n}" for n in ["norm1.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                     "attn_out.weight", "norm2.weight", "mlp.0.weight", "mlp.0.bias",
                                                     "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight",
                                                     "adaLN_modulation.bias"]]
    assert names[-5:] == ["output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
                          "output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]
    owt = ModelConfig(d_model=768, n_layers=12, n_heads=12, cond_dim=128)
    with torch.device("meta"):
        big = DiT(owt, ModelShape(vocab_size=50258, seq_len=1024))
    assert count_parameters(DiT(owt, ModelShape(vocab_size=50258, seq_len=1024), device="meta")) == 169_627_218
    assert count_parameters(big) == 169_627_218


def test_time_conditioning_switch():
    torch.manual_seed(0)
    off = DiT(TINY, SHAPE)
    randomise(off)
    tokens = torch.randint(0, 40, (2, 12))
    assert torch.equal(off(tokens, torch.tensor([0.1, 3.0])), off(tokens, torch.tensor([0.0, 0.0])))
    on = DiT(ModelConfig(**{**TINY.__dict__, "time_conditioning": True}), SHAPE)
    randomise(on)
    assert not torch.allclose(on(tokens, torch.tensor([0.1, 3.0])), on(tokens, torch.tensor([0.0, 0.0])))


def reference_attention(q, k, v, backend):
    """Textbook softmax(QK^T / sqrt(d)) V, [B, L, H, d]."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2)


def test_sdpa_matches_reference_attention_and_is_bidirectional(monkeypatch):
    model = DiT(TINY, SHAPE)
    randomise(model)
    tokens = torch.randint(0, 40, (3, 12))
    fast = model(tokens)
    monkeypatch.setattr(model_module, "attention", reference_attention)
    assert torch.allclose(fast, model(tokens), atol=1e-5)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 40
    assert not torch.allclose(model(changed)[:, 0], fast[:, 0])  # the first position sees the last


def test_rotary_is_relative():
    """Rotary q.k depends on the distance between positions only."""
    model = DiT(TINY, SHAPE)
    cos, sin = model.rotary_emb(12, torch.device("cpu"))
    q = torch.randn(1, 1, 1, 8).expand(1, 12, 1, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 12, 1, 8)
    qr, kr = model_module.apply_rotary(q, cos, sin), model_module.apply_rotary(k, cos, sin)
    dots = (qr[0, :, 0] @ kr[0, :, 0].T)
    assert torch.allclose(dots[2, 5], dots[6, 9], atol=1e-5)
    assert torch.allclose(dots[7, 1], dots[10, 4], atol=1e-5)


def test_flops_formula_matches_flop_counter(monkeypatch):
    """FlopCounterMode has no formula for CPU SDPA, so count attention as plain matmuls."""
    monkeypatch.setattr(model_module, "attention", reference_attention)
    cfg = ModelConfig(d_model=64, n_layers=3, n_heads=4, cond_dim=32)
    shape = ModelShape(vocab_size=100, seq_len=24)
    model = DiT(cfg, shape)
    tokens = torch.randint(0, 100, (5, 24))
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    assert counter.get_total_flops() == 5 * forward_flops_per_sequence(cfg, shape)
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().square().sum().backward()
    assert counter.get_total_flops() == pytest.approx(3 * 5 * forward_flops_per_sequence(cfg, shape), rel=0.01)


def test_layer_norm_runs_in_fp32_under_bf16_autocast():
    model = DiT(TINY, SHAPE)
    x = torch.randn(2, 12, 32, dtype=torch.bfloat16)
    block = model.blocks["0"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block.norm1(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, F.layer_norm(x.float(), [32]), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or model_module._flash_attn_func() is None,
                    reason="needs CUDA and flash-attn")
def test_flash_attention_matches_sdpa():  # pragma: no cover - GPU only
    q, k, v = (torch.randn(2, 64, 4, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flash = model_module.attention(q, k, v, "flash")
    sdpa = model_module.attention(q, k, v, "sdpa")
    assert torch.allclose(flash.float(), sdpa.float(), atol=2e-2)


def test_family_registry_builds_the_dit_and_maps_the_published_names():
    """The DiT is found by name; its checkpoint-name mapping gives the published MDLM/ProSeCo
    layout (backbone., vocab_embed.embedding, fused attn_qkv) and inverts exactly."""
    from pretrain.models import family_names, get_family

    family = get_family("dit")
    assert "dit" in family_names() and family.forward_flops(TINY, SHAPE) == forward_flops_per_sequence(TINY, SHAPE)
    model = family.build(TINY, SHAPE)
    randomise(model)
    state = {name: p.detach() for name, p in model.named_parameters()}
    official = family.to_official(state)
    d = TINY.d_model
    assert official["backbone.vocab_embed.embedding"] is state["vocab_embed.weight"]
    assert official["backbone.blocks.1.attn_qkv.weight"].shape == (3 * d, d)
    assert torch.equal(official["backbone.blocks.1.attn_qkv.weight"][d:2 * d], state["blocks.1.attn_k.weight"])
    assert not any("attn_q." in name for name in official) and len(official) == len(state) - 2 * TINY.n_layers
    back = family.from_official({**official, "noise.sigmas": torch.zeros(1)})  # non-backbone keys are dropped
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_the_attention_kernel_a_run_uses_is_named(monkeypatch):
    """What the run log says: SDPA on CPU whatever is asked; flash-attn only on CUDA in bf16 with
    the package importable (auto or flash), as model.attention() chooses."""
    import importlib.util

    from pretrain.models.dit.config import DiTConfig

    assert DiTConfig().kernels("cpu", "bf16") == "attention: PyTorch SDPA on cpu"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name))
    assert DiTConfig().kernels("cuda", "bf16") == "attention: flash-attn"
    assert DiTConfig().kernels("cuda", "fp32") == "attention: PyTorch SDPA on cuda"
    assert DiTConfig(attention="sdpa").kernels("cuda", "bf16") == "attention: PyTorch SDPA on cuda"
