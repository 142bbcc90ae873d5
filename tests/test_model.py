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
    """Names and shapes follow kuleshov-group/proseco-owt (one fused attn_qkv), and the
    parameter count matches the paper's 169,627,218 for the OWT configuration."""
    names = [n for n, _ in DiT(TINY, SHAPE).named_parameters()]
    assert names[:5] == ["vocab_embed.weight", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias",
                         "sigma_map.mlp.2.weight", "sigma_map.mlp.2.bias"]
    assert names[5:15] == [f"blocks.0.{n}" for n in ["norm1.weight", "attn_qkv.weight", "attn_out.weight",
                                                     "norm2.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                                     "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias"]]
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


def test_rotary_turns_each_pair_by_its_angle():
    """Element i pairs with i + hd/2 (rotate-half) and turns by position * inv_freq[i], as complex
    multiplication; q and k rotated side by side ([B, L, H, 2, hd]) equal each rotated alone."""
    rotary = model_module.Rotary(8, 10000.0)
    cos, sin = rotary(6, torch.device("cpu"))
    x = torch.randn(2, 6, 3, 8)
    first, second = x.chunk(2, dim=-1)
    angles = torch.arange(6.0)[:, None] * rotary.inv_freq[None, :]
    turned = torch.complex(first, second) * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    expected = torch.cat([turned.real, turned.imag], dim=-1)
    torch.testing.assert_close(model_module.apply_rotary(x, cos, sin), expected)
    both = model_module.apply_rotary(torch.stack([x, 2 * x], dim=3), cos, sin)
    torch.testing.assert_close(both, torch.stack([expected, 2 * expected], dim=3))


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
    official = family.to_official(state, TINY)
    d, heads, hd = TINY.d_model, TINY.n_heads, TINY.d_model // TINY.n_heads
    assert official["backbone.vocab_embed.embedding"] is state["vocab_embed.weight"]
    fused = official["backbone.blocks.1.attn_qkv.weight"]
    assert fused.shape == (3 * d, d) and len(official) == len(state)
    # Published rows [3, H, hd]: k's rows of head 2 sit at d + 2*hd; ours ([H, 3, hd]) at (2*3 + 1)*hd.
    ours = state["blocks.1.attn_qkv.weight"]
    assert torch.equal(fused[d + 2 * hd:d + 3 * hd], ours[7 * hd:8 * hd])
    assert torch.equal(fused.view(3, heads, hd, d).transpose(0, 1).reshape(3 * d, d), ours)
    back = family.from_official({**official, "noise.sigmas": torch.zeros(1)}, TINY)  # non-backbone keys dropped
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_head_major_fused_projection_is_the_three_separate_projections():
    """One attn_qkv with rows [H, 3, hd] computes what three projections q, k, v (the rows of each
    head taken from them) computed: the fused block's output equals a block run with the
    separate projections, so the rearrangement changed no arithmetic."""
    torch.manual_seed(0)
    block = DiTBlock(TINY)
    randomise(block)
    heads, hd = TINY.n_heads, TINY.d_model // TINY.n_heads
    separate = [torch.nn.Linear(TINY.d_model, TINY.d_model, bias=False) for _ in range(3)]
    with torch.no_grad():
        rows = block.attn_qkv.weight.view(heads, 3, hd, TINY.d_model)
        for i, layer in enumerate(separate):
            layer.weight.copy_(rows[:, i].reshape(TINY.d_model, TINY.d_model))

    def three_projections(h, rotary):  # and q, k rotated one at a time
        q, k, v = (layer(h).view(*h.shape[:2], heads, hd) for layer in separate)
        tables = rotary(h.shape[1], h.device)
        return model_module.apply_rotary(q, *tables), model_module.apply_rotary(k, *tables), v

    x, c = torch.randn(2, SHAPE.seq_len, TINY.d_model), torch.randn(2, TINY.cond_dim)
    rotary = model_module.Rotary(hd, TINY.rope_base)
    fused = block(x, c, rotary)
    h = torch.randn(2, SHAPE.seq_len, TINY.d_model)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(block._qkv(h, rotary), three_projections(h, rotary)))
    block._qkv = three_projections
    assert torch.allclose(fused, block(x, c, rotary), atol=1e-6)


def test_checkpoint_names_of_the_earlier_split_projections_are_fused_on_load():
    """State dicts (any prefix) holding attn_q/attn_k/attn_v, as checkpoints of the earlier code do,
    map onto attn_qkv concatenated head-major; a lone projection is refused by name."""
    from pretrain.errors import CheckpointError
    from pretrain.models import get_family

    family = get_family("dit")
    model = family.build(TINY, SHAPE)
    randomise(model)
    heads, hd, d = TINY.n_heads, TINY.d_model // TINY.n_heads, TINY.d_model
    state = {name: p.detach() for name, p in model.named_parameters()}
    old = {}
    for name, tensor in state.items():
        if name.endswith("attn_qkv.weight"):
            q, k, v = tensor.view(heads, 3, hd, d).unbind(1)
            old.update({name.replace("qkv", x): t.reshape(d, d) for x, t in zip("qkv", (q, k, v))})
        else:
            old[name] = tensor
    for prefix in ("", "ema."):
        upgraded = family.upgrade_state({prefix + n: t for n, t in old.items()}, TINY)
        assert upgraded.keys() == {prefix + n for n in state}
        assert all(torch.equal(upgraded[prefix + n], state[n]) for n in state)
    assert family.upgrade_state(state, TINY) == state
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn_k\.weight is missing"):
        family.upgrade_state({"blocks.0.attn_q.weight": old["blocks.0.attn_q.weight"]}, TINY)
    misshapen = {**old, "blocks.1.attn_v.weight": torch.zeros(d, d + 1)}
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn_q/k/v\.weight .* not three equal projections"):
        family.upgrade_state(misshapen, TINY)


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


def test_a_block_runs_one_gemm_for_q_k_and_v():
    """Five GEMMs per block forward (adaLN, the fused q/k/v, attention output, two MLP layers),
    as benchmarks/gemm_count.py counts them; the three separate projections made seven."""
    from benchmarks.gemm_count import count_gemms

    block = DiTBlock(TINY)
    x, c = torch.randn(2, SHAPE.seq_len, TINY.d_model), torch.randn(2, TINY.cond_dim)
    rotary = model_module.Rotary(TINY.d_model // TINY.n_heads, TINY.rope_base)
    counts = count_gemms(lambda: block(x, c, rotary))
    assert sum(counts.values()) == 5 and counts["mm"] == 2 and counts["addmm"] == 3, counts
