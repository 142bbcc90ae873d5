"""Hugging Face folders in a family's published layout (the DiT's proseco-owt, LLaDA's GSAI-ML)
streamed into a rank's shards by model.init_from, one parameter at a time (pretrain/convert/stream.py):
the same weights as reading the folder whole, on every layout, from sharded safetensors, reading
each rank's slices only, and with far less memory than the model.

The folders are written key by key from random weights as tests/test_convert.py and
tests/test_llada.py write them, then re-saved as safetensors shards with an index.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pretrain.convert.stream as stream
from pretrain.convert import hf_folder
from pretrain.convert.layouts import PAPER, folder_config, resize_vocab, to_folder
from pretrain.convert.source import open_source
from pretrain.errors import CheckpointError
from pretrain.models import ModelShape, get_family
from tests import test_convert, test_llada
from tests.helpers import torchrun

VOCAB = 50  # padded to 56 rows at model.vocab_multiple=8: the streamed rows past 50 are zero
DIT = ["model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.cond_dim=16"]  # test_convert's sizes
LLADA = ["model.family=llada", "model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
         "model.mlp_hidden_size=48"]  # test_llada's


def reshard(folder: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """The folder's model.safetensors as `dtype` shards of at most `max_shard_bytes`, with an index."""
    tensors = {name: t.to(dtype) for name, t in load_file(folder / hf_folder.SAFETENSORS).items()}
    (folder / hf_folder.SAFETENSORS).unlink()
    hf_folder.write_weights(folder, tensors, max_shard_bytes)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The DiT in the paper's layout (float32, 3+ shards) and LLaDA in GSAI-ML's (bfloat16 as
    released, 3+ shards)."""
    root = tmp_path_factory.mktemp("published")
    test_convert.write_official_folder(root / "dit", VOCAB)
    reshard(root / "dit", torch.float32, 40_000)
    test_llada.write_official_folder(root / "llada", VOCAB)
    reshard(root / "llada", torch.bfloat16, 20_000)
    return {"dit": root / "dit", "llada": root / "llada"}


def loaded(source, vocab_multiple: int = 8) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The weights streamed into a model of the source's config (vocabulary padded to
    `vocab_multiple`), and those of reading the source whole, re-padded the same way."""
    family = get_family(source.run.model.family)
    cfg = dataclasses.replace(source.run.model, vocab_multiple=vocab_multiple)
    shape = ModelShape.of(cfg)
    model = family.build(cfg, shape, device="cpu")
    params = dict(model.named_parameters())
    source.load_into(params, shape.vocab_size)
    whole = resize_vocab(family, source.load(), cfg.vocab_size, shape.vocab_size)
    return {name: p.detach() for name, p in params.items()}, whole


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    differ = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert differ == []


@pytest.mark.parametrize("family_name, sizes", [("dit", DIT), ("llada", LLADA)])
def test_weight_sources_invert_the_export_one_parameter_at_a_time(family_name, sizes):
    """For every parameter of random weights: the stored tensors weight_sources names, taken from
    to_official's output (the published layout) or under a prefix (this framework's), make the
    parameter again exactly; a name to_official gives that weight_sources does not know fails."""
    from pretrain.config import load_config

    cfg = load_config(None, [*sizes, f"model.vocab_size={VOCAB}", "model.seq_len=16"]).model
    family = get_family(family_name)
    model = family.build(cfg, ModelShape.of(cfg), device="cpu", seed=1)
    weights = {name: torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
               for i, (name, p) in enumerate(model.named_parameters())}
    for official, stored in ((True, family.to_official(weights, cfg)),
                             (False, {"ema." + name: t for name, t in weights.items()})):
        plan = stream.plan_reads(family, cfg, weights, stored, prefix="ema.", official=official)
        assert plan is not None and {key for keys, _ in plan.values() for key in keys} == set(stored)
        for name, (keys, combine) in plan.items():
            rebuilt = stored[keys[0]] if combine is None else combine([stored[key] for key in keys])
            assert torch.equal(rebuilt, weights[name]), name


@pytest.mark.parametrize("family", ["dit", "llada"])
@pytest.mark.parametrize("vocab_multiple", [1, 8])
def test_a_published_folder_streams_what_reading_it_whole_gives(folders, family, vocab_multiple):
    """In one process, sharded files, the DiT's permuted attn_qkv, LLaDA's bf16, the vocabulary
    kept (multiple 1) or re-padded with zero rows (multiple 8): bit for bit the whole read's."""
    index = json.loads((folders[family] / hf_folder.SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) >= 3
    source = open_source(folders[family])
    assert source.load_into is not None and source.kind == f"Hugging Face folder ({PAPER} layout)"
    got, whole = loaded(source, vocab_multiple)
    assert_same(got, whole)
    vocab = get_family(family).vocab_parameters[0]
    assert got[vocab].shape[0] == (56 if vocab_multiple == 8 else VOCAB)
    assert not got[vocab][VOCAB:].any() and got[vocab][:VOCAB].std() > 0


def test_only_the_slice_a_shard_needs_is_read(folders, monkeypatch):
    """A parameter stored as it is: the block of its rows and columns the shard holds (here a
    plain tensor standing for a shard: a view into a larger local one is read as the whole);
    the DiT's attn_qkv, whose rows are permuted: the whole stored tensor."""
    reads = []
    real = stream.read_tensor
    monkeypatch.setattr(stream, "read_tensor", lambda file, key, index=None: reads.append((key, index))
                        or real(file, key, index))
    source = open_source(folders["dit"])
    loaded(source)
    by_key = dict(reads)
    assert by_key["backbone.blocks.0.attn_qkv.weight"] is None  # combined: read whole
    assert by_key["backbone.vocab_embed.embedding"] == (slice(0, VOCAB), slice(0, 32))  # only the real rows
    assert by_key["backbone.blocks.0.norm1.weight"] == (slice(0, 32),)


@pytest.mark.parametrize("family", ["dit", "llada"])
def test_a_slice_read_in_pieces_of_a_few_rows_is_the_same(folders, family, monkeypatch):
    """stream.READ_BYTES bounds one read: at 3 rows of 32 float32 the pieces' edges fall inside
    every parameter, and the weights are still the whole read's."""
    monkeypatch.setattr(stream, "READ_BYTES", 3 * 32 * 4)
    calls = []
    real = stream.read_tensor
    monkeypatch.setattr(stream, "read_tensor", lambda *args: calls.append(args) or real(*args))
    got, whole = loaded(open_source(folders[family]))
    assert_same(got, whole)
    embedding = {"dit": "backbone.vocab_embed.embedding", "llada": "model.transformer.wte.weight"}[family]
    vocab_reads = [args[2][0] for args in calls if args[1] == embedding]
    assert [(s.start, s.stop) for s in vocab_reads] == [(i, min(i + 3, VOCAB)) for i in range(0, VOCAB, 3)]


def test_a_consolidated_file_with_the_earlier_split_names_streams(tmp_path):
    """attn_q, attn_k, attn_v apart (what the code before the fusion wrote): the one parameter's
    three tensors are read and fused, as loading the whole file fuses them."""
    from pretrain.config import load_config, to_dict

    cfg = load_config(None, [*DIT, f"model.vocab_size={VOCAB}", "model.seq_len=16", "model.vocab_multiple=8"])
    family = get_family("dit")
    model = family.build(cfg.model, ModelShape.of(cfg.model), device="cpu", seed=3)
    weights = {name: p.detach() + 0.01 for name, p in model.named_parameters()}  # no zero layers
    file = tmp_path / "legacy.safetensors"
    save_file(test_convert.split_qkv({"ema." + name: t for name, t in weights.items()}), str(file),
              metadata={"config": json.dumps(to_dict(cfg))})
    source = open_source(file)
    assert source.load_into is not None
    got, whole = loaded(source)
    assert_same(got, whole)
    assert_same(got, weights)


def test_a_pytorch_bin_folder_is_read_whole(tmp_path):
    test_convert.write_official_folder(tmp_path / "bin", VOCAB, pickled=True)
    source = open_source(tmp_path / "bin")
    rows = ModelShape.of(source.run.model).vocab_size
    assert source.load_into is None and source.load()["vocab_embed.weight"].shape == (rows, 32)


def test_a_weight_that_is_not_floating_point_is_refused_by_name(tmp_path):
    state = test_convert.official_state(VOCAB, torch.Generator().manual_seed(0))
    state["backbone.blocks.1.attn_out.weight"] = state["backbone.blocks.1.attn_out.weight"].to(torch.int32)
    test_convert.write_official_folder(tmp_path / "int", VOCAB, state=state)
    source = open_source(tmp_path / "int")
    with pytest.raises(CheckpointError, match=r"backbone\.blocks\.1\.attn_out\.weight is a torch\.int32 tensor"):
        loaded(source)


@pytest.mark.distributed
def test_dp2_tp2_and_pp2_load_the_one_process_weights_reading_only_their_slices(folders, tmp_path):
    """One launch of 2 ranks: both published folders by model.init_from at dp=2 (FSDP2), tp=2 and
    pp=2 give, gathered, the weights of one process reading the folder whole, bit for bit; at dp=2
    each stored tensor a parameter is renamed from is read once over the two ranks (each its
    half) and only the DiT's permuted attn_qkv tensors whole, by both."""
    cases = [{"name": "dit", "folder": str(folders["dit"]), "overrides": DIT},
             {"name": "llada", "folder": str(folders["llada"]), "overrides": LLADA}]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    torchrun(2, "tests/dist/stream_worker.py", "same", str(tmp_path / "cases.json"), str(tmp_path / "out.json"))
    results = json.loads((tmp_path / "out.json").read_text())
    assert [(r["case"], r["layout"]) for r in results] == [(c, layout) for c in ("dit", "llada")
                                                          for layout in ("dp2", "tp2", "pp2")]
    for r in results:
        assert r["streamed"] and r["names_match"] and r["differ"] == [], r
    for r in (r for r in results if r["layout"] == "dp2"):
        assert sum(r["read_bytes"]) == r["renamed"] + 2 * r["combined"], r
        assert max(r["read_bytes"]) <= 0.6 * r["renamed"] + r["combined"], r
    assert next(r for r in results if r["case"] == "dit")["combined"] > 0  # the permuted path was taken
    assert next(r for r in results if r["case"] == "llada")["combined"] == 0


def write_published(family_name: str, folder: Path, dtype: torch.dtype) -> object:
    """The ~140 MB model of benchmarks/build_memory.py in the family's published layout, as
    `dtype` safetensors shards of 40 MB; returns the model, its weights rounded to `dtype`."""
    from benchmarks.build_memory import COMMON, SIZES
    from pretrain.config import load_config

    cfg = load_config(None, [*COMMON, *SIZES[family_name]])
    family = get_family(family_name)
    model = family.build(cfg.model, ModelShape.of(cfg.model), device="cpu", seed=9)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype))
    weights = {name: p.detach().to(dtype) for name, p in model.named_parameters()}
    folder.mkdir()
    hf_folder.write_config(folder, folder_config(family, cfg, PAPER))
    hf_folder.write_weights(folder, to_folder(family, cfg.model, weights, PAPER), 40 * 10**6)
    return model


@pytest.mark.distributed
@pytest.mark.parametrize("family, dtype", [("dit", torch.float32), ("llada", torch.bfloat16)])
def test_streaming_a_published_folder_at_dp2_adds_little_to_a_ranks_peak_memory(family, dtype, tmp_path):
    """model.init_from of a ~140 MB model in its published layout (sharded safetensors; LLaDA in
    bf16 as released) at dp=2: the gathered weights are the folder's, bit for bit, and the peak
    resident memory a rank adds while loading (measured: the kernel's high-water mark) is a small
    part of the full model's fp32 weights, where reading the folder whole, as before, added all
    of it and more."""
    from benchmarks.build_memory import weight_digests

    model = write_published(family, tmp_path / "published", dtype)
    expected = weight_digests([model])
    del model
    assert len(hf_folder.weight_files(tmp_path / "published")) >= 2
    out = tmp_path / "memory.json"
    torchrun(2, "benchmarks/build_memory.py", "--worker", family, str(out), "parallel.dp=2",
             f"model.init_from={tmp_path / 'published'}")
    measured = json.loads(out.read_text())
    for rank in measured["ranks"]:
        assert rank["loaded"] == expected, rank["rank"]
        peak = {k: v for k, v in rank.items() if k != "loaded"} | {"full_bytes": measured["full_bytes"]}
        assert rank["load_peak_bytes"] <= 0.3 * measured["full_bytes"], peak
        print(f"{family} rank {rank['rank']}: load peak {rank['load_peak_bytes'] / measured['full_bytes']:.3f}, "
              f"build peak {rank['peak_bytes'] / measured['full_bytes']:.3f} of the full model")
