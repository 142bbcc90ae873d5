"""Checkpoint conversion: export to Hugging Face folders (both layouts), import of the paper's
released layout, model.init_from, and the errors of malformed folders.

The released models cannot be downloaded here, so folders in their layout are written from
random weights, key by key from the table in the method notes (section 4.4), not through this
project's own name mapping.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.checkpoint import consolidate, load_model, read_meta
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.convert import hf_folder
from pretrain.convert.hf_export import export_checkpoint
from pretrain.convert.hf_import import import_folder
from pretrain.convert.layouts import folder_config
from pretrain.convert.source import open_source
from pretrain.errors import CheckpointError, ConfigError, UserError
from pretrain.metrics import read_metrics
from pretrain.models import get_family
from pretrain.models.dit.model import DiT
from pretrain.optim import EMA
from pretrain.train import Trainer, train
from tests.dist.parallel_worker import TINY, random_init
from tests.helpers import make_word_shards, torchrun

MODELING = Path(__file__).resolve().parents[1] / "pretrain" / "models" / "dit" / "modeling_proseco.py"
D, LAYERS, HEADS, COND = 32, 4, 4, 16  # TINY's DiT
RUN = ["train.eval_every=0", "train.eval_batches=1", "checkpoint.every=0", "sampling.num_samples=2",
       "sampling.batch_size=2", "sampling.steps=2", "logging.log_every=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_word_shards(tmp_path_factory.mktemp("corpus"), seq_len=16)


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.shards={shards}", f"logging.run_dir={run_dir}", *RUN, *extra]


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory) -> Path:
    """A run of 2 steps from random (non-zero) weights: EMA and raw weights differ, every logit is live."""
    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DiT, "init_weights", random_init)
        train(load_config(None, overrides(shards, run_dir, "train.max_steps=2")))
    return run_dir


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def transformers_logits(folder: Path, tokens: torch.Tensor, **kwargs):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    with torch.no_grad():
        return model(tokens, **kwargs)


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 1e-2  # live logits, not the zeros of a fresh adaLN-Zero model
    assert (got - expected).abs().max().item() <= 1e-5 * scale


# -- a folder in the released layout, written key by key ----------------------------------------

def official_state(vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every key and shape of kuleshov-group/proseco-owt's state dict (method notes 4.4), for the
    tiny sizes, filled with random numbers."""
    shapes = {"backbone.vocab_embed.embedding": (vocab, D),
              "backbone.sigma_map.mlp.0.weight": (COND, 256), "backbone.sigma_map.mlp.0.bias": (COND,),
              "backbone.sigma_map.mlp.2.weight": (COND, COND), "backbone.sigma_map.mlp.2.bias": (COND,)}
    for i in range(LAYERS):
        block = f"backbone.blocks.{i}."
        shapes.update({block + "norm1.weight": (D,), block + "attn_qkv.weight": (3 * D, D),
                       block + "attn_out.weight": (D, D), block + "norm2.weight": (D,),
                       block + "mlp.0.weight": (4 * D, D), block + "mlp.0.bias": (4 * D,),
                       block + "mlp.2.weight": (D, 4 * D), block + "mlp.2.bias": (D,),
                       block + "adaLN_modulation.weight": (6 * D, COND), block + "adaLN_modulation.bias": (6 * D,)})
    shapes.update({"backbone.output_layer.norm_final.weight": (D,), "backbone.output_layer.linear.weight": (vocab, D),
                   "backbone.output_layer.linear.bias": (vocab,),
                   "backbone.output_layer.adaLN_modulation.weight": (2 * D, COND),
                   "backbone.output_layer.adaLN_modulation.bias": (2 * D,)})
    state = {name: torch.randn(shape, generator=generator) * 0.2 for name, shape in shapes.items()}
    head_dim = D // HEADS
    state["backbone.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return state


def write_official_folder(folder: Path, vocab: int, state: dict | None = None, pickled: bool = False) -> dict:
    """The released layout: ProsecoConfig's config.json, the weights (safetensors or a PyTorch
    state dict) and, for transformers, a modeling file (ours: the released one is not here)."""
    state = official_state(vocab, torch.Generator().manual_seed(1)) if state is None else state
    folder.mkdir(parents=True)
    config = {"model_type": "proseco", "auto_map": {"AutoConfig": "modeling_proseco.ProsecoConfig",
                                                    "AutoModelForMaskedLM": "modeling_proseco.Proseco"},
              "vocab_size": vocab, "model_length": 16, "hidden_dim": D, "cond_dim": COND, "n_blocks": LAYERS,
              "n_heads": HEADS, "dropout": 0.1, "time_conditioning": False, "cfg": False, "cfg_num_classes": -1,
              "return_dict": False}
    (folder / "config.json").write_text(json.dumps(config))
    if pickled:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))
    shutil.copyfile(MODELING, folder / MODELING.name)
    return state


# -- export ---------------------------------------------------------------------------------------

def test_export_then_import_is_the_identity_bit_for_bit(run, tmp_path):
    """Default layout, sharded: import gives back every EMA tensor (padding rows included) as both
    the raw and the EMA weights, and the tokenizer; --raw exports the raw weights."""
    ema_model, cfg, tokenizer = load_model(run, use_ema=True)
    raw_model, _, _ = load_model(run, use_ema=False)
    ema, raw = parameters(ema_model), parameters(raw_model)
    assert any(not torch.equal(ema[n], raw[n]) for n in ema)

    exported = export_checkpoint(run, tmp_path / "hf", max_shard_bytes=20_000)
    shards = [f for f in exported.files if f.startswith("model-")]
    assert len(shards) > 2 and (tmp_path / "hf" / hf_folder.SAFETENSORS_INDEX).is_file()
    assert exported.weights == "EMA"
    imported = import_folder(tmp_path / "hf", tmp_path / "imported")
    for use_ema in (True, False):
        back, back_cfg, back_tokenizer = load_model(imported.run_dir, use_ema=use_ema)
        assert parameters(back).keys() == ema.keys()
        assert all(torch.equal(p, ema[name]) for name, p in parameters(back).items())
    assert back_tokenizer.sha256 == tokenizer.sha256 and back_cfg.model == cfg.model
    assert read_meta(imported.checkpoint)["has_ema"]

    export_checkpoint(run, tmp_path / "raw", use_ema=False)
    assert (tmp_path / "raw" / hf_folder.SAFETENSORS).is_file()  # below the default threshold: one file
    back, _, _ = load_model(import_folder(tmp_path / "raw", tmp_path / "raw-imported").run_dir)
    assert all(torch.equal(p, raw[name]) for name, p in parameters(back).items())


def test_the_paper_layout_holds_the_released_keys_and_config(run, tmp_path):
    """--layout proseco-hf: backbone.* keys, fused attn_qkv rows [q; k; v], the bare embedding,
    the rotary buffer, the real vocabulary only and ProsecoConfig's fields; importing it back
    gives every weight bit for bit, the padding rows zero."""
    model, cfg, tokenizer = load_model(run)
    ours = parameters(model)
    export_checkpoint(run, tmp_path / "paper", layout="proseco-hf")
    tensors = load_file(tmp_path / "paper" / hf_folder.SAFETENSORS)
    vocab = tokenizer.vocab_size
    assert set(tensors) == set(official_state(vocab, torch.Generator().manual_seed(0)))
    qkv = tensors["backbone.blocks.2.attn_qkv.weight"]  # ours: rows [H, 3, hd]; the paper's: [3, H, hd]
    head_major = ours["blocks.2.attn_qkv.weight"].view(HEADS, 3, D // HEADS, D)
    assert torch.equal(qkv, head_major.transpose(0, 1).reshape(3 * D, D))
    assert torch.equal(tensors["backbone.vocab_embed.embedding"], ours["vocab_embed.weight"][:vocab])
    config = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks",
                                   "n_heads", "cfg", "return_dict")} == {
        "model_type": "proseco", "vocab_size": vocab, "model_length": 16, "hidden_dim": D, "cond_dim": COND,
        "n_blocks": LAYERS, "n_heads": HEADS, "cfg": False, "return_dict": False}
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_proseco.Proseco" and "weights_layout" not in config

    back, _, _ = load_model(import_folder(tmp_path / "paper", tmp_path / "back").run_dir)
    for name, p in parameters(back).items():
        rows = vocab if name in ("vocab_embed.weight", "output_layer.linear.weight", "output_layer.linear.bias") \
            else p.shape[0]
        assert torch.equal(p[:rows], ours[name][:rows]) and not p[rows:].any(), name

    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mlp_ratio=2))
    with pytest.raises(UserError, match="its DiT fixes mlp_ratio=4, .* this one has model.mlp_ratio=2"):
        folder_config(get_family("dit"), wider, "proseco-hf")


@pytest.mark.parametrize("layout", ["proseco-pretrain", "proseco-hf"])
def test_transformers_on_an_export_gives_our_logits(run, tmp_path, layout):
    model, _, tokenizer = load_model(run)
    export_checkpoint(run, tmp_path / "hf", layout=layout)
    tokens = torch.randint(0, tokenizer.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens)[..., : tokenizer.vocab_size]
    assert_close(transformers_logits(tmp_path / "hf", tokens), expected)  # return_dict=False, as released
    output = transformers_logits(tmp_path / "hf", tokens, timesteps=torch.rand(3), return_dict=True)
    assert_close(output.logits, expected)  # timesteps are zeroed without time conditioning


def test_the_modeling_file_imports_only_torch_and_transformers():
    """It is copied into folders and run where this project is not installed."""
    tree = ast.parse(MODELING.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module}
    assert modules == {"__future__", "math", "torch", "transformers"}


# -- import of the released layout ----------------------------------------------------------------

def test_a_released_layout_folder_imports_exactly_with_the_gpt2_tokenizer(tmp_path):
    """A pytorch_model.bin in the released layout, vocabulary 50258: each head's q, k, v rows of our
    head-major attn_qkv are those rows of the released [q; k; v], every weight is bit for bit, the
    vocabulary is padded with zeros to a multiple of 64, the tokenizer is GPT-2's with the mask at
    50257, and the logits are those transformers computes from the released layout."""
    state = write_official_folder(tmp_path / "released", vocab=50258, pickled=True)
    imported = import_folder(tmp_path / "released", tmp_path / "run", kind="gpt2")
    model, cfg, tokenizer = load_model(imported.run_dir)
    ours = parameters(model)
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.mask_id) == ("gpt2", 50258, 50257)
    assert ours["vocab_embed.weight"].shape == (50304, D) and not ours["vocab_embed.weight"][50258:].any()
    assert torch.equal(ours["vocab_embed.weight"][:50258], state["backbone.vocab_embed.embedding"])
    for i in range(LAYERS):
        q, k, v = state[f"backbone.blocks.{i}.attn_qkv.weight"].split(D)
        head_major = ours[f"blocks.{i}.attn_qkv.weight"].view(HEADS, 3, D // HEADS, D)
        for j, w in enumerate((q, k, v)):
            assert torch.equal(head_major[:, j].reshape(D, D), w)
    assert torch.equal(ours["output_layer.linear.bias"][:50258], state["backbone.output_layer.linear.bias"])
    assert cfg.model.dropout == 0.1 and cfg.model.seq_len == 16
    tokens = torch.randint(0, 50258, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens)[..., :50258]
    assert_close(transformers_logits(tmp_path / "released", tokens), expected)


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted pytorch_model.bin does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _missing(state):
    del state["backbone.blocks.1.attn_out.weight"]


def _reshaped(state):
    state["backbone.blocks.2.mlp.0.weight"] = torch.zeros(4 * D, D + 1)


def _extra(state):
    state["backbone.cond_map.embedding_table.weight"] = torch.zeros(3, COND)


@pytest.mark.parametrize("edit, message", [
    (_missing, f"backbone.blocks.1.attn_out.weight is missing; the model its config.json describes .* has it with "
               f"shape \\[{D}, {D}\\]"),
    (_reshaped, f"backbone.blocks.2.mlp.0.weight has shape \\[{4 * D}, {D + 1}\\], but the model its config.json "
                f"describes .* has \\[{4 * D}, {D}\\]"),
    (_extra, "backbone.cond_map.embedding_table.weight \\(shape \\[3, 16\\]\\) is not a tensor of the model"),
])
def test_a_malformed_folder_names_the_first_mismatching_key(tmp_path, edit, message):
    state = official_state(40, torch.Generator().manual_seed(0))
    edit(state)
    write_official_folder(tmp_path / "bad", vocab=40, state=state)
    with pytest.raises(CheckpointError, match=message):
        import_folder(tmp_path / "bad", tmp_path / "out", kind="gpt2")
    assert not (tmp_path / "out").exists()


def test_a_pickle_that_needs_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    state = official_state(40, torch.Generator().manual_seed(0))
    folder = tmp_path / "crafted"
    write_official_folder(folder, vocab=40, state=state, pickled=True)
    torch.save({**state, "backbone.extra": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to unpickle .*pytorch_model.bin: it needs the global .*system"):
        import_folder(folder, tmp_path / "out", kind="gpt2")
    assert not marker.exists()
    (folder / "config.json").write_text(json.dumps({"model_type": "proseco", "vocab_size": 40}))
    with pytest.raises(CheckpointError, match="config.json lacks model_length"):
        import_folder(folder, tmp_path / "out", kind="gpt2")


def test_the_command_line_converts_both_ways_and_reports_errors(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["convert", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and "export" in text and "import" in text and "--kind gpt2" in text
    assert main(["convert", "export", str(run), str(tmp_path / "hf"), "--layout", "proseco-hf", "--raw"]) == 0
    assert "proseco-hf layout, raw weights" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "hf" / "tokenizer")  # as in the released folders
    assert main(["convert", "import", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    assert "pass --kind gpt2" in capsys.readouterr().err
    assert main(["convert", "import", str(tmp_path / "hf"), str(tmp_path / "run"), "--tokenizer",
                 str(run / "checkpoints" / "step_00000002" / "tokenizer")]) == 0
    assert "step_00000000" in capsys.readouterr().out


# -- model.init_from ------------------------------------------------------------------------------

def test_init_from_reads_every_kind_of_source(run, tmp_path):
    """A checkpoint, a consolidated file and folders in both layouts give the same EMA weights."""
    ema = parameters(load_model(run)[0])
    export_checkpoint(run, tmp_path / "ours")
    export_checkpoint(run, tmp_path / "paper", layout="proseco-hf")
    sources = [run, consolidate(run, tmp_path / "full.safetensors"), tmp_path / "ours", tmp_path / "paper"]
    vocab = load_model(run)[1].model.vocab_size
    for path in sources:
        weights = open_source(path).load()
        assert weights.keys() == ema.keys(), path
        assert all(torch.equal(weights[n][:vocab], ema[n][:vocab]) for n in ema), path
    raw = parameters(load_model(run, use_ema=False)[0])
    assert all(torch.equal(t, raw[n]) for n, t in open_source(run, ema=False).load().items())


def test_init_from_then_three_steps_equals_loading_the_weights_by_hand(run, shards, tmp_path):
    """A new run from an exported folder: fresh step, optimizer and data position, and the same
    weights, EMA and losses as a run whose weights were set by hand before its first step."""
    export_checkpoint(run, tmp_path / "hf")
    common = ["train.max_steps=3", "optim.warmup_steps=2"]
    started = tmp_path / "init-from"
    train(load_config(None, overrides(shards, started, *common, f"model.init_from={tmp_path / 'hf'}")))

    by_hand = tmp_path / "by-hand"
    trainer = Trainer(load_config(None, overrides(shards, by_hand, *common)), _single())
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    with torch.no_grad():
        for name, p in trainer.parts[0].named_parameters():
            p.copy_(weights["backbone." + name])
    trainer.ema = EMA(trainer.parts, trainer.cfg.optim.ema_decay)
    trainer.run()

    for use_ema in (True, False):
        a, b = parameters(load_model(started, use_ema=use_ema)[0]), parameters(load_model(by_hand, use_ema=use_ema)[0])
        assert all(torch.equal(a[n], b[n]) for n in a)
    meta = read_meta(started / "checkpoints" / "step_00000003")
    assert meta["data"]["position"] == 3 * 8 and meta["step"] == 3  # from the first sample, not the source's
    losses = [[r["loss"] for r in read_metrics(d) if r["split"] == "train"] for d in (started, by_hand)]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def _single():
    from parallel.env import DistEnv

    return DistEnv(0, 1, 0, torch.device("cpu"), "single")


def test_init_from_shapes_are_checked_before_any_process_group(run, shards, tmp_path, monkeypatch):
    import pretrain.train as train_module

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started before the check")

    monkeypatch.setattr(train_module, "init_distributed", no_process_group)
    cfg = load_config(None, overrides(shards, tmp_path / "wide", "model.d_model=48", f"model.init_from={run}"))
    with pytest.raises(ConfigError, match=r"model.init_from=.*: vocab_embed.weight has shape \[32, 32\], but this "
                                          r"config's model has \[32, 48\]"):
        train(cfg)
    cfg = load_config(None, overrides(shards, tmp_path / "gone", f"model.init_from={tmp_path / 'nothing'}"))
    with pytest.raises(ConfigError, match="model.init_from=.*nothing: no complete checkpoint"):
        train(cfg)


def test_resuming_an_imported_checkpoint_points_to_init_from(run, shards, tmp_path):
    export_checkpoint(run, tmp_path / "hf")
    imported = import_folder(tmp_path / "hf", tmp_path / "imported")
    cfg = load_config(None, overrides(shards, tmp_path / "resume", f"checkpoint.resume={imported.checkpoint}"))
    with pytest.raises(CheckpointError, match="holds weights only .* model.init_from="):
        train(cfg)


@pytest.mark.distributed
def test_an_imported_released_folder_gives_one_process_logits_at_tp2_and_pp2(run, shards, tmp_path):
    """The released layout (random weights, this corpus's vocabulary) imported once, then loaded at
    tp=2 and at pp=2, by DCP resharding and by model.init_from: the one-process logits. The tp=2
    run's own checkpoint (tp=2 shards) then exports to the same weights."""
    vocab = load_model(run)[2].vocab_size
    write_official_folder(tmp_path / "released", vocab=vocab)
    imported = import_folder(tmp_path / "released", tmp_path / "imported",
                             tokenizer=shards / "tokenizer", vocab_multiple=8)
    out = tmp_path / "logits" / "result.json"
    out.parent.mkdir()
    torchrun(2, "tests/dist/convert_worker.py", "logits", str(imported.checkpoint), str(out),
             *overrides(shards, tmp_path / "unused"))
    result = json.loads(out.read_text())
    assert result["scale"] > 1e-2
    for key in ("tp2_dcp", "tp2_init_from", "pp2_dcp", "pp2_init_from"):
        assert 0 <= result[key] <= 1e-5 * result["scale"], (key, result)

    saved = out.parent / "tp2" / "checkpoints" / "step_00000000"
    assert read_meta(saved)["world_size"] == 2
    export_checkpoint(saved, tmp_path / "from-tp2")
    again = parameters(load_model(import_folder(tmp_path / "from-tp2", tmp_path / "again").run_dir)[0])
    expected = parameters(load_model(imported.run_dir)[0])
    assert all(torch.equal(again[n], expected[n]) for n in expected)


def test_proseco_fine_tuning_of_an_mdlm_checkpoint(shards, tmp_path):
    """The paper's protocol: an MDLM run, then a new ProSeCo run from its weights (model.init_from).
    Its first step trains the corrector from the MDLM network's argmax; with
    diffusion.corrector_input=masked the corrector sees clean tokens where nothing was masked,
    so fewer of its input tokens are wrong than with `all`, where an MDLM network's argmax at
    unmasked positions (it never trained there) is often wrong."""
    mdlm = tmp_path / "mdlm"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DiT, "init_weights", random_init)
        train(load_config(None, overrides(shards, mdlm, "train.max_steps=2", "diffusion.corrector_training=false")))
    assert all(r["corrector_nll"] == 0 for r in read_metrics(mdlm) if r["split"] == "train")
    first_step = {}
    for corrector_input in ("all", "masked"):
        run_dir = tmp_path / f"proseco-{corrector_input}"
        train(load_config(None, overrides(shards, run_dir, "train.max_steps=1", f"model.init_from={mdlm}",
                                          "diffusion.corrector_training=true",
                                          f"diffusion.corrector_input={corrector_input}")))
        first_step[corrector_input] = next(r for r in read_metrics(run_dir) if r["split"] == "train")
    for record in first_step.values():
        assert record["step"] == 1 and record["corrector_nll"] != 0
    # The same weights, batch and masks: the MDLM term is identical, the corrector inputs are not.
    assert first_step["all"]["mdlm_nelbo"] == first_step["masked"]["mdlm_nelbo"]
    assert first_step["masked"]["corrector_input_error"] < first_step["all"]["corrector_input_error"]


# -- checkpoints written before q, k, v were fused ------------------------------------------------

def split_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names and tensors of the earlier code: each block's head-major attn_qkv (under any
    prefix) as the three projections attn_q, attn_k, attn_v it holds the rows of."""
    out = {}
    for name, tensor in state.items():
        if not name.endswith("attn_qkv.weight"):
            out[name] = tensor
            continue
        for x, part in zip("qkv", tensor.view(HEADS, 3, D // HEADS, D).unbind(1)):
            out[name.replace("attn_qkv", f"attn_{x}")] = part.reshape(D, D).clone()
    return out


def test_checkpoints_with_the_earlier_split_names_still_load(run, shards, tmp_path):
    """A DCP checkpoint, a consolidated file and an export holding attn_q/attn_k/attn_v (what the
    earlier code wrote) load as today's head-major attn_qkv, bit for bit, by every reader
    (load_model, consolidate, export, import, model.init_from); resuming one names the way out."""
    from safetensors import safe_open

    from pretrain.checkpoint import Checkpointer, read_dcp_metadata, require_verified

    path = run / "checkpoints" / "step_00000002"
    ema, raw = parameters(load_model(run)[0]), parameters(load_model(run, use_ema=False)[0])
    meta = read_meta(path)
    old = Checkpointer(tmp_path / "old" / "checkpoints").save(
        2, {"model": split_qkv(raw), "ema": split_qkv(ema)},
        {k: meta[k] for k in ("config", "has_ema", "step", "ema_num_updates", "tokens_seen", "world_size")},
        {"tokenizer": path / "tokenizer"})
    require_verified(old, "digest", collective=False)
    stored = read_dcp_metadata(old / ".metadata").state_dict_metadata
    assert "model.blocks.0.attn_q.weight" in stored and "model.blocks.0.attn_qkv.weight" not in stored

    def same(weights, expected):
        assert weights.keys() == expected.keys() and all(torch.equal(weights[n], expected[n]) for n in expected)

    for use_ema, expected in ((True, ema), (False, raw)):
        same(parameters(load_model(old, use_ema=use_ema)[0]), expected)
        same(open_source(old, ema=use_ema).load(), expected)
    full = load_file(consolidate(old, tmp_path / "full.safetensors"))
    same({n: full[n] for n in raw}, raw)
    same({n: full["ema." + n] for n in ema}, ema)
    legacy_file = tmp_path / "legacy.safetensors"  # a file consolidated by the earlier code
    with safe_open(str(tmp_path / "full.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(split_qkv(full), str(legacy_file), metadata=metadata)
    same(open_source(legacy_file).load(), ema)
    same(open_source(legacy_file, ema=False).load(), raw)

    export_checkpoint(old, tmp_path / "hf")
    same(parameters(load_model(import_folder(tmp_path / "hf", tmp_path / "imported").run_dir)[0]), ema)
    folder = tmp_path / "hf"  # an export by the earlier code: the same folder with the split names
    save_file(split_qkv(load_file(folder / hf_folder.SAFETENSORS)), str(folder / hf_folder.SAFETENSORS),
              metadata={"format": "pt"})
    same(open_source(folder).load(), ema)
    same(parameters(load_model(import_folder(folder, tmp_path / "imported-old").run_dir)[0]), ema)

    cfg = load_config(None, overrides(shards, tmp_path / "resume", f"checkpoint.resume={old}"))
    with pytest.raises(CheckpointError, match=r"earlier version .*attn_qkv.* model.init_from="):
        train(cfg)
