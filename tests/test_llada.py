"""The LLaDA family (pretrain/models/llada): the published 8B size, the FLOP formula, the
published Hugging Face layout both ways, tp=2 and pp=2 against one process, and training.

GSAI-ML/LLaDA-8B cannot be downloaded here, so folders in its layout are written from random
weights at a tiny size, key by key from the published modeling file's module tree
(LLaDAModelLM.model.transformer.*), not through this project's own name mapping.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from pretrain.checkpoint import load_model
from pretrain.cli import main as cli_main
from pretrain.config import load_config, validate
from pretrain.convert import source
from pretrain.convert.hf_export import export_checkpoint
from pretrain.convert.hf_import import import_folder
from pretrain.errors import CheckpointError, UserError
from pretrain.metrics import read_metrics
from pretrain.models import ModelShape, count_parameters, get_family
from pretrain.models.init import materialise
from pretrain.models.llada.checkpoint_names import model_fields
from pretrain.models.llada.config import LLADA_8B, LLaDAConfig, num_parameters
from pretrain.models.llada.model import LLaDA, forward_flops_per_sequence
from pretrain.train import train
from tests.dist.llada_worker import TINY
from tests.helpers import make_word_shards, torchrun
from tokenizer.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODELING = ROOT / "pretrain" / "models" / "llada" / "modeling_llada.py"
D, LAYERS, HEADS, KV_HEADS, HIDDEN = 32, 4, 4, 2, 48  # TINY's LLaDA (grouped-query attention)
RUN = ["train.eval_every=0", "train.eval_batches=1", "checkpoint.every=0", "sampling.num_samples=2",
       "sampling.batch_size=2", "sampling.steps=2", "logging.log_every=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_word_shards(tmp_path_factory.mktemp("corpus"), seq_len=16)


def tiny(**fields) -> LLaDAConfig:
    return LLaDAConfig(**{"d_model": D, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS,
                          "mlp_hidden_size": HIDDEN, "vocab_size": 40, "vocab_multiple": 8, "seq_len": 16, **fields})


# -- size and cost --------------------------------------------------------------------------------

def test_the_published_8b_config_counts_its_parameters_exactly():
    """GSAI-ML/LLaDA-8B's config.json, built on the meta device: 8,015,581,184 parameters, published
    as 8.02B in all and 6.98B without the embedding and output layer."""
    cfg = LLaDAConfig(**model_fields(LLADA_8B))
    shape = ModelShape.of(cfg)
    assert shape.vocab_size == 126464  # already a multiple of 64: no padding rows
    model = LLaDA(cfg, shape, device="meta")
    total = count_parameters(model)
    vocabulary = 2 * 126464 * 4096
    assert total == num_parameters(cfg, shape.vocab_size) == 8_015_581_184
    assert round(total / 1e9, 2) == 8.02 and round((total - vocabulary) / 1e9, 2) == 6.98
    block = 4 * 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096
    assert total == 32 * block + vocabulary + 4096


def test_parameter_count_formula_matches_the_built_model():
    for cfg in (tiny(), tiny(n_kv_heads=None), tiny(n_kv_heads=1, mlp_hidden_size=20)):
        shape = ModelShape.of(cfg)
        assert count_parameters(LLaDA(cfg, shape, device="meta")) == num_parameters(cfg, shape.vocab_size)


def matmul_attention(q, k, v, is_causal, enable_gqa):
    """Attention as plain matmuls, the key/value heads repeated for their query groups:
    FlopCounterMode has no formula for CPU SDPA."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_forward_flops_match_the_flop_counter(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", matmul_attention)  # model.py's F
    for cfg in (tiny(), tiny(n_kv_heads=None), tiny(seq_len=24, n_kv_heads=1)):
        shape = ModelShape.of(cfg)
        model = LLaDA(cfg, shape)
        tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(tokens)
        assert counter.get_total_flops() == 3 * forward_flops_per_sequence(cfg, shape)
        with FlopCounterMode(display=False) as counter:
            model(tokens).square().sum().backward()
        assert counter.get_total_flops() == pytest.approx(3 * 3 * forward_flops_per_sequence(cfg, shape), rel=0.01)


def test_config_problems_name_the_field_and_the_fix():
    assert tiny().problems() == [] and tiny().layout_problems(2) == []
    assert "not divisible by model.n_heads" in tiny(d_model=30).problems()[0]
    assert "must be even for rotary" in tiny(d_model=12, n_heads=4, n_kv_heads=None).problems()[0]
    assert "does not divide model.n_heads" in tiny(n_kv_heads=3).problems()[0]
    assert "beyond any machine" in tiny(d_model=2**20, n_heads=2**10, n_kv_heads=None, n_layers=2**10).problems()[0]
    layout = tiny(n_kv_heads=1).layout_problems(2)
    assert len(layout) == 1 and "model.n_kv_heads=1 is not divisible by parallel.tp=2" in layout[0]
    assert any("mlp_hidden_size=20" in p for p in tiny(mlp_hidden_size=20).layout_problems(8))


# -- the module -----------------------------------------------------------------------------------

def reference_logits(model: LLaDA, tokens: torch.Tensor) -> torch.Tensor:
    """The published forward written out: repeat_interleave for the key/value groups, an explicit
    softmax over every position (no causal mask), rotate-half rotary in fp32."""
    cfg = model.cfg
    hd = cfg.d_model // cfg.n_heads
    length = tokens.shape[1]
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.outer(torch.arange(length).float(), inv_freq).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()

    def norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def rope(t):  # [B, H, L, hd]
        x1, x2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-x2, x1], dim=-1) * sin

    x = model.wte.weight[tokens]
    for block in model.blocks.values():
        h = norm(x, block.attn_norm.weight)
        q = (h @ block.q_proj.weight.T).unflatten(-1, (cfg.n_heads, hd)).transpose(1, 2)
        k = (h @ block.k_proj.weight.T).unflatten(-1, (cfg.kv_heads, hd)).transpose(1, 2)
        v = (h @ block.v_proj.weight.T).unflatten(-1, (cfg.kv_heads, hd)).transpose(1, 2)
        group = cfg.n_heads // cfg.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        weights = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd), dim=-1)
        x = x + (weights @ v).transpose(1, 2).flatten(2) @ block.attn_out.weight.T
        h = norm(x, block.ff_norm.weight)
        gate = torch.nn.functional.silu(h @ block.ff_proj.weight.T)
        x = x + (gate * (h @ block.up_proj.weight.T)) @ block.ff_out.weight.T
    return norm(x, model.ln_f.weight) @ model.ff_out.weight.T


def test_the_forward_is_the_published_one_bidirectional_and_blind_to_sigma():
    torch.manual_seed(0)
    cfg = tiny()
    model = LLaDA(cfg, ModelShape.of(cfg)).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.no_grad():
        logits = model(tokens)
        assert torch.allclose(logits, reference_logits(model, tokens), atol=1e-5, rtol=1e-5)
        assert torch.equal(model(tokens, torch.rand(2)), logits)  # no time input
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size
        assert not torch.allclose(model(changed)[:, 0], logits[:, 0])  # the first position sees the last
        model.emit_features = True
        features = model(tokens)
    assert torch.allclose(model.output_head(features), logits, atol=1e-6)


def test_pipeline_stages_keep_the_full_model_names_and_compose():
    cfg = tiny()
    full = LLaDA(cfg, ModelShape.of(cfg), seed=3).eval()
    family = get_family("llada")
    stages = [materialise(family.build_stage(cfg, ModelShape.of(cfg), stage, [1, 2, 1]), "cpu", 3)
              for stage in range(3)]  # built on the meta device, initialised keyed: the full model's weights
    names = [name for stage in stages for name, _ in stage.named_parameters()]
    assert sorted(names) == sorted(name for name, _ in full.named_parameters())
    assert stages[1].wte is None and stages[1].ff_out is None and stages[1].output_head is None
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.no_grad():
        assert torch.equal(stages[2](stages[1](stages[0](tokens))), full(tokens))


# -- the published Hugging Face layout ------------------------------------------------------------

def official_state(vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """GSAI-ML/LLaDA-8B's state dict keys (LLaDAModelLM.model.transformer.*) at TINY's size."""
    kv = KV_HEADS * (D // HEADS)
    shapes = {"model.transformer.wte.weight": (vocab, D), "model.transformer.ln_f.weight": (D,),
              "model.transformer.ff_out.weight": (vocab, D)}
    for i in range(LAYERS):
        block = f"model.transformer.blocks.{i}."
        shapes.update({block + "attn_norm.weight": (D,), block + "ff_norm.weight": (D,),
                       block + "q_proj.weight": (D, D), block + "k_proj.weight": (kv, D),
                       block + "v_proj.weight": (kv, D), block + "attn_out.weight": (D, D),
                       block + "ff_proj.weight": (HIDDEN, D), block + "up_proj.weight": (HIDDEN, D),
                       block + "ff_out.weight": (D, HIDDEN)})
    return {name: torch.randn(shape, generator=generator) * 0.3 for name, shape in shapes.items()}


def write_official_folder(folder: Path, vocab: int) -> dict[str, torch.Tensor]:
    """The published layout: LLaDA's config.json fields (with its auto_map; the released modeling
    file is not here, so no remote code) and model.safetensors."""
    state = official_state(vocab, torch.Generator().manual_seed(1))
    folder.mkdir(parents=True)
    config = {**LLADA_8B, "model_type": "llada", "architectures": ["LLaDAModelLM"],
              "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                           "AutoModel": "modeling_llada.LLaDAModelLM",
                           "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
              "d_model": D, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "mlp_hidden_size": HIDDEN,
              "mlp_ratio": 4, "vocab_size": vocab, "embedding_size": vocab, "max_sequence_length": 16,
              "mask_token_id": vocab - 1, "eos_token_id": 1, "pad_token_id": 1, "attention_dropout": 0.0,
              "residual_dropout": 0.0, "embedding_dropout": 0.0, "layer_norm_with_affine": True,
              "bias_for_layer_norm": False, "include_qkv_bias": False, "scale_logits": False,
              "input_emb_norm": False, "attention_layer_norm": False, "block_group_size": 1,
              "rope_full_precision": True, "init_std": 0.02, "init_fn": "mitchell", "use_cache": False}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    return state


@pytest.fixture
def imported(shards, tmp_path):
    """A tiny published-layout folder of random weights, imported (vocabulary padded to 8)."""
    vocab = load_tokenizer(shards / "tokenizer").vocab_size
    state = write_official_folder(tmp_path / "released", vocab)
    result = import_folder(tmp_path / "released", tmp_path / "imported", tokenizer=shards / "tokenizer",
                           vocab_multiple=8)
    return state, result


def test_a_published_folder_imports_and_exports_back_bit_for_bit(imported, tmp_path):
    state, result = imported
    vocab = state["model.transformer.wte.weight"].shape[0]
    assert result.run.model.family == "llada"
    assert (result.run.model.d_model, result.run.model.n_kv_heads, result.run.model.mlp_hidden_size) == (D, 2, 48)
    model, cfg, _ = load_model(result.run_dir)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    rows = ModelShape.of(cfg.model).vocab_size
    assert rows % 8 == 0 and rows >= vocab
    for name, tensor in state.items():
        ours = weights[name.removeprefix("model.transformer.")]
        assert torch.equal(ours[: tensor.shape[0]], tensor), name
        assert not ours[tensor.shape[0]:].any()  # padding rows start at zero
    export_checkpoint(result.checkpoint, tmp_path / "published", layout="proseco-hf")
    exported = load_file(str(tmp_path / "published" / "model.safetensors"))
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[name], state[name]) for name in state)
    config = json.loads((tmp_path / "published" / "config.json").read_text())
    assert config["model_type"] == "llada" and "weights_layout" not in config
    released = json.loads((tmp_path / "released" / "config.json").read_text())
    differ = {key for key in config.keys() & released.keys() if config[key] != released[key]}
    assert differ == {"auto_map"}  # ours names this project's modeling file (the released one is not shipped)
    assert {"d_model", "n_kv_heads", "mlp_hidden_size", "rope_theta", "block_type", "weight_tying"} <= config.keys()
    # and this framework's own layout: the same names, the padded rows, the run config
    export_checkpoint(result.checkpoint, tmp_path / "ours")
    again, _, _ = load_model(import_folder(tmp_path / "ours", tmp_path / "again").run_dir)
    assert all(torch.equal(p.detach(), weights[name]) for name, p in again.named_parameters())


def test_transformers_on_an_export_gives_our_logits(imported, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, result = imported
    model, _, tokenizer = load_model(result.run_dir)
    tokens = torch.randint(0, tokenizer.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens)[..., : tokenizer.vocab_size]
    scale = expected.abs().max().item()
    assert scale > 1e-2
    for layout in ("proseco-pretrain", "proseco-hf"):
        export_checkpoint(result.checkpoint, tmp_path / layout, layout=layout)
        hf = transformers.AutoModel.from_pretrained(str(tmp_path / layout), trust_remote_code=True).eval()
        with torch.no_grad():
            got = hf(tokens).logits
        assert got.shape == expected.shape and (got - expected).abs().max().item() <= 1e-5 * scale, layout


def test_the_modeling_file_imports_only_torch_and_transformers():
    tree = ast.parse(MODELING.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module}
    assert modules == {"__future__", "torch", "transformers"}


@pytest.mark.parametrize("edit, message", [
    ({"block_type": "sequential"}, "block_type='sequential'; this framework's LLaDA builds block_type='llama'"),
    ({"weight_tying": True}, "weight_tying=True"),
    ({"embedding_size": 4096}, "embedding_size=4096 beside vocab_size"),
    ({"alibi": True}, "alibi=True"),
])
def test_an_unsupported_published_config_is_refused_by_name(edit, message):
    with pytest.raises(UserError, match=message):
        model_fields({**LLADA_8B, **edit})
    with pytest.raises(UserError, match="lacks rope"):
        model_fields({name: value for name, value in LLADA_8B.items() if name != "rope"})


def test_a_folder_with_a_wrong_shape_names_the_key(shards, tmp_path):
    state = write_official_folder(tmp_path / "bad", 40)
    state["model.transformer.blocks.1.k_proj.weight"] = torch.zeros(D, D)  # full heads, not 2 kv heads
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.k_proj\.weight has shape \[32, 32\], but .* \[16, 32\]"):
        source.open_source(tmp_path / "bad")


# -- parallel layouts and training ----------------------------------------------------------------

@pytest.mark.distributed
def test_dp2_tp2_and_pp2_give_one_process_logits_losses_and_gradients(imported, shards, tmp_path):
    """One launch of 2 ranks: the imported published folder at tp=2 and pp=2 (by DCP and by
    model.init_from) gives the one-process logits; one step from random weights at dp=2 (FSDP2),
    tp=2 (whole and chunked logits, sequence parallel) and pp=2 (GPipe, 1F1B) its loss and
    gradients."""
    _, result = imported
    out = tmp_path / "check" / "result.json"
    out.parent.mkdir()
    torchrun(2, "tests/dist/llada_worker.py", "check", str(result.checkpoint), str(shards), str(out))
    found = json.loads(out.read_text())
    assert found["logit_scale"] > 1e-2
    for key in ("tp2_dcp", "tp2_init_from", "pp2_dcp", "pp2_init_from"):
        assert 0 <= found[key] <= 1e-5 * found["logit_scale"], (key, found)
    assert len(found["gradients"]) == 4 + 6  # reuse: the dp and tp layouts; two_pass: all six
    for r in found["gradients"]:
        assert r["names_match"], r
        assert r["loss_error"] <= 1e-6 * abs(r["reference_loss"]), r
        assert r["grad_error"] <= 1e-6 * r["grad_scale"], r


def test_a_few_training_steps_through_the_trainer(shards, tmp_path):
    """model.family=llada trains through the Trainer: with the chunked loss and activation
    checkpointing the same losses as with whole logits and none, step for step; the checkpoint
    loads back as the LLaDA of the run's config, and samples."""
    def run(name: str, *extra: str) -> list[float]:
        cfg = load_config(None, [*TINY, f"data.shards={shards}", f"logging.run_dir={tmp_path / name}", *RUN,
                                 "train.max_steps=4", "optim.lr=3e-3", *extra])
        assert isinstance(cfg.model, LLaDAConfig)
        train(cfg)
        return [row["loss"] for row in read_metrics(tmp_path / name) if row.get("split") == "train"]

    chunked = run("chunked", "parallel.activation_checkpointing=true", "diffusion.loss_chunk_tokens=7")
    whole = run("whole", "diffusion.loss_chunk_tokens=0")
    assert len(chunked) == 4 and all(math.isfinite(loss) for loss in chunked)
    assert chunked == pytest.approx(whole, rel=1e-5)
    model, loaded, _ = load_model(tmp_path / "chunked")
    assert isinstance(model, LLaDA) and loaded.model.n_kv_heads == 2
    out = tmp_path / "samples.jsonl"  # and the sampler runs it, corrector loops included
    assert cli_main(["sample", "--checkpoint", str(tmp_path / "chunked"), "--num-samples", "2", "--steps", "4",
                     "--corrector-steps", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["nfe_denoiser"] == 4 and r["nfe_corrector"] >= 1 for r in rows)


def test_a_run_config_reads_and_checks_the_llada_section(shards):
    """model.family=llada selects this family's section; its checks and its plan's run before any
    process starts (pretrain.config.validate), each naming the field."""
    base = [*TINY, f"data.shards={shards}", "logging.run_dir=/tmp/unused"]
    cfg = load_config(None, base)
    assert isinstance(cfg.model, LLaDAConfig) and cfg.model.n_kv_heads == 2
    with pytest.raises(UserError, match="model.n_kv_heads=3 does not divide model.n_heads=4"):
        validate(load_config(None, [*base, "model.n_kv_heads=3"]), 1)
    with pytest.raises(UserError, match="model.n_kv_heads=1 is not divisible by parallel.tp=2"):
        validate(load_config(None, [*base, "model.n_kv_heads=1", "parallel.tp=2"]), 2)
    with pytest.raises(UserError, match="cond_dim"):
        load_config(None, [*base, "model.cond_dim=16"])  # a DiT field: not LLaDA's
