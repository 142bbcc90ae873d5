"""Token shards: layouts, counts, manifest, readers, determinism, validation split, errors, verify."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pretrain.errors import UserError
from tests.test_tokenizer import write_smiles_corpus, write_text_corpus
from tokenizer import shard as shard_module
from tokenizer import tasks as tasks_module
from tokenizer.cli import add_commands
from tokenizer.corpora import CorpusError, iter_documents
from tokenizer.format import MANIFEST, Geometry, ShardReader, read_manifest, write_shard
from tokenizer.shard import ShardingError, shard_corpus, verify_shards
from tokenizer.storage import Store
from tokenizer.tokenizers import CONFIG_FILE, TokenizerError, UnknownCharacterError, load_tokenizer
from tokenizer.train import OutputExistsError, train_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shards")


@pytest.fixture(scope="module")
def text_corpus(workdir) -> Path:
    write_text_corpus(workdir / "text.txt", documents=300)
    return workdir / "text.txt"


@pytest.fixture(scope="module")
def smiles_corpus(workdir) -> Path:
    write_smiles_corpus(workdir / "smiles.txt", count=400)
    return workdir / "smiles.txt"


@pytest.fixture(scope="module")
def bpe(workdir, text_corpus):
    return train_tokenizer(str(text_corpus), "bpe", workdir / "bpe", 600)


@pytest.fixture(scope="module")
def char(workdir, smiles_corpus):
    return train_tokenizer(str(smiles_corpus), "char", workdir / "char", line_documents=True, val_fraction=0.0)


def read_split(folder: Path, split: str) -> np.ndarray:
    """All samples of a split, in key order, through ShardReader (checking every header)."""
    manifest = read_manifest(folder)
    rows = []
    for info in manifest.splits[split].shards:
        reader = ShardReader(Store(folder), info, Geometry.of(manifest))
        tokens, ok = reader.read(0, info.samples)
        assert ok.all()
        rows.append(tokens)
    return np.concatenate(rows) if rows else np.zeros((0, manifest.seq_len), dtype=np.int64)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Layouts and counts


def test_pack_layout_and_counts(workdir, text_corpus, bpe):
    seq_len = 32
    out = workdir / "pack"
    manifest = shard_corpus(str(text_corpus), bpe.folder, seq_len, out, samples_per_shard=50, workers=1,
                            val_fraction=0.1)
    assert manifest.packing == "pack"
    for split in ("train", "val"):
        docs = list(iter_documents(str(text_corpus), split, val_fraction=0.1))
        stream = [t for doc in docs for t in bpe.encode(doc) + [bpe.eos_id]]
        body = seq_len - 2
        expected = [[bpe.bos_id] + stream[i: i + body] + [bpe.eos_id] for i in range(0, len(stream) - body + 1, body)]
        samples = read_split(out, split)
        assert len(samples) == len(stream) // body == manifest.splits[split].samples
        assert manifest.stats[f"{split}_dropped_tokens"] == len(stream) % body
        assert manifest.stats[f"{split}_documents"] == len(docs)
        assert manifest.stats[f"{split}_tokens"] == len(stream) - len(docs)
        # The same rows, shuffled: never in stream order.
        assert sorted(map(tuple, samples.tolist())) == sorted(map(tuple, expected))
        assert samples.tolist() != expected
        assert (samples[:, 0] == bpe.bos_id).all() and (samples[:, -1] == bpe.eos_id).all()


def test_pad_layout_truncation_and_counts(workdir, smiles_corpus, char):
    seq_len = 20  # most fake SMILES fit in 18 characters (else the pad check refuses), the longer ones are cut
    out = workdir / "pad"
    manifest = shard_corpus(str(smiles_corpus), char.folder, seq_len, out, workers=1, line_documents=True,
                            val_fraction=0.1)
    assert manifest.packing == "pad"
    for split in ("train", "val"):
        docs = list(iter_documents(str(smiles_corpus), split, line_documents=True, val_fraction=0.1))
        samples = read_split(out, split)
        assert len(samples) == len(docs) == manifest.stats[f"{split}_samples"]
        truncated = [d for d in docs if len(d) > seq_len - 2]
        assert manifest.stats[f"{split}_truncated"] == len(truncated) > 0
        assert manifest.stats[f"{split}_dropped_tokens"] == sum(len(d) - (seq_len - 2) for d in truncated)
        assert Counter(char.decode_document(row) for row in samples) == Counter(d[: seq_len - 2] for d in docs)
        for row in samples.tolist():
            end = row.index(char.eos_id)
            assert row[0] == char.bos_id and char.pad_id not in row[:end] and char.eos_id not in row[1:end]
            assert all(t == char.pad_id for t in row[end + 1:])


def test_layout_functions_exactly():
    layout = shard_module.Layout("pad", 6, "uint16", bos_id=1, eos_id=2, pad_id=0)
    flat = np.array([10, 11, 12, 13, 14, 15, 16, 17], dtype=np.int64)
    lengths = np.array([2, 0, 6], dtype=np.int64)
    assert shard_module.pad_documents(flat, lengths, layout).tolist() == [
        [1, 10, 11, 2, 0, 0], [1, 2, 0, 0, 0, 0], [1, 12, 13, 14, 15, 2]]
    stream = shard_module.join_documents(flat, lengths, eos_id=2, dtype="uint16")
    assert stream.tolist() == [10, 11, 2, 2, 12, 13, 14, 15, 16, 17, 2]
    pack = shard_module.Layout("pack", 5, "uint16", bos_id=1, eos_id=2, pad_id=0)
    assert shard_module.pack_stream(stream, pack).tolist() == [[1, 10, 11, 2, 2], [1, 2, 12, 13, 2], [1, 14, 15, 16, 2]]


# ---------------------------------------------------------------------------------------------
# Manifest, readers, determinism


def test_manifest_and_both_readers(workdir, text_corpus, bpe):
    out = workdir / "readers"
    manifest = shard_corpus(str(text_corpus), bpe.folder, 24, out, samples_per_shard=64, workers=1, seed=3)
    on_disk = read_manifest(out)
    assert on_disk == manifest
    assert (on_disk.seq_len, on_disk.dtype, on_disk.vocab_size) == (24, "uint16", 600)
    assert on_disk.tokenizer_sha256 == bpe.sha256 == load_tokenizer(out / "tokenizer").sha256
    assert on_disk.fingerprint == on_disk.compute_fingerprint() and len(on_disk.fingerprint) == 16
    assert on_disk.stats["seed"] == 3 and str(text_corpus.resolve()) in on_disk.corpus
    assert on_disk.content == "text"  # a PATH corpus is text unless told otherwise
    train = on_disk.splits["train"]
    # One corpus chunk (the corpus is far below 64 MiB): shards 0000.. of chunk 000000.
    assert [s.path for s in train.shards] == [f"train/shard-000000-{i:04d}.tar" for i in range(len(train.shards))]
    assert [s.first_key for s in train.shards] == list(range(0, train.samples, 64))
    assert all(s.samples == 64 for s in train.shards[:-1]) and sum(s.samples for s in train.shards) == train.samples
    for info in train.shards:
        data = (out / info.path).read_bytes()
        assert len(data) == info.bytes and hashlib.sha256(data).hexdigest() == info.sha256
    # Plain webdataset reads the same samples: one record per member, a block of up to K samples
    # keyed by its first sample (every shard here is smaller than one block).
    assert on_disk.format == "proseco-shards-v2" and on_disk.block_samples == (1 << 20) // (24 * 2)
    paths = [str(out / s.path) for s in train.shards]
    records = list(wds.WebDataset(paths, shardshuffle=False).decode())
    assert [r["__key__"] for r in records] == [f"{s.first_key:012d}" for s in train.shards]
    assert [r["tokens.npy"].shape for r in records] == [(s.samples, 24) for s in train.shards]
    from_wds = np.concatenate([r["tokens.npy"] for r in records])
    assert from_wds.dtype == np.uint16 and (from_wds == read_split(out, "train")).all()
    assert verify_shards(out) == []
    # v1, one sample per member, holds the same samples in the same shards under the same keys.
    v1 = shard_corpus(str(text_corpus), bpe.folder, 24, workdir / "readers-v1", samples_per_shard=64, workers=1,
                      seed=3, shard_format="proseco-shards-v1")
    assert v1.format == "proseco-shards-v1" and v1.block_samples == 1 and verify_shards(workdir / "readers-v1") == []
    records = list(wds.WebDataset([str(workdir / "readers-v1" / s.path) for s in v1.splits["train"].shards],
                                   shardshuffle=False).decode())
    assert [r["__key__"] for r in records] == [f"{k:012d}" for k in range(train.samples)]
    assert (np.stack([r["tokens.npy"] for r in records]) == from_wds).all()


def test_same_seed_gives_identical_bytes_with_any_worker_count(workdir, smiles_corpus, char):
    options = dict(line_documents=True, val_fraction=0.1, samples_per_shard=100)
    one = shard_corpus(str(smiles_corpus), char.folder, 24, workdir / "det1", workers=1, seed=7, **options)
    two = shard_corpus(str(smiles_corpus), char.folder, 24, workdir / "det2", workers=2, seed=7, **options)
    assert two.fingerprint == one.fingerprint
    assert (workdir / "det1" / MANIFEST).read_bytes() == (workdir / "det2" / MANIFEST).read_bytes()
    for split in ("train", "val"):
        for info in one.splits[split].shards:
            assert (workdir / "det1" / info.path).read_bytes() == (workdir / "det2" / info.path).read_bytes()
    other = shard_corpus(str(smiles_corpus), char.folder, 24, workdir / "det3", workers=1, seed=8, **options)
    assert other.fingerprint != one.fingerprint
    a, b = read_split(workdir / "det1", "train"), read_split(workdir / "det3", "train")
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist())) and not (a == b).all()


def test_manifest_records_the_content_and_reads_old_manifests_by_their_corpus(workdir, smiles_corpus, char):
    out = workdir / "content"
    parser = argparse.ArgumentParser(prog="proseco")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokenizer", "shard", "--corpus", str(smiles_corpus), "--line-documents",
                              "--content", "smiles", "--tokenizer", str(char.folder), "--seq-len", "24",
                              "--out", str(out), "--workers", "1"])
    args.func(args)
    assert read_manifest(out).content == "smiles"
    assert json.loads((out / MANIFEST).read_text())["content"] == "smiles"
    # Written before manifests had the field: the content its built-in corpus declares, by exact
    # name; any other corpus (a PATH, even one named like a built-in) is text.
    raw = json.loads((out / MANIFEST).read_text())
    del raw["content"]
    for corpus, content in [("moses", "smiles"), ("moses(limit=500, max_chars=38)", "smiles"),
                            ("shakespeare", "text"), (str(workdir / "moses"), "text"), ("moses.txt", "text"),
                            (str(smiles_corpus.resolve()) + "(line_documents=True)", "text")]:
        (out / MANIFEST).write_text(json.dumps({**raw, "corpus": corpus}))
        assert read_manifest(out).content == content, corpus
    assert verify_shards(out) == []  # the content is not part of the fingerprint
    (out / MANIFEST).write_text(json.dumps({**raw, "content": "protein"}))
    with pytest.raises(UserError, match="not a readable manifest.*'protein'"):
        read_manifest(out)
    with pytest.raises(ShardingError, match="--content 'protein'"):
        shard_corpus(str(smiles_corpus), char.folder, 24, workdir / "protein", workers=1, line_documents=True,
                     content="protein")


def test_validation_split_holds_out_what_it_should(workdir, smiles_corpus, char):
    out = workdir / "val"
    shard_corpus(str(smiles_corpus), char.folder, 48, out, workers=1, line_documents=True, val_fraction=0.2)
    expected_val = list(iter_documents(str(smiles_corpus), "val", line_documents=True, val_fraction=0.2))
    got_val = [char.decode_document(row) for row in read_split(out, "val")]
    got_train = [char.decode_document(row) for row in read_split(out, "train")]
    assert Counter(got_val) == Counter(expected_val) and 40 <= len(got_val) <= 120
    assert not set(got_val) & set(got_train)


def test_shakespeare_val_shards_are_the_held_out_plays(workdir, capsys):
    # Characters and one play per sample (pad, L above the longest play) keep this to about a second.
    tok = train_tokenizer("shakespeare", "char", workdir / "shakespeare-char")
    out = workdir / "shakespeare-plays"
    parser = argparse.ArgumentParser(prog="proseco")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokenizer", "shard", "--corpus", "shakespeare", "--tokenizer", str(tok.folder),
                              "--seq-len", "200000", "--out", str(out), "--workers", "1", "--samples-per-shard", "16"])
    args.func(args)
    assert "val 3 samples in 1 shards" in capsys.readouterr().out
    plays = {split: [tok.decode_document(row) for row in read_split(out, split)] for split in ("train", "val")}
    assert sorted(plays["val"]) == sorted(iter_documents("shakespeare", "val"))
    assert sorted(plays["train"]) == sorted(iter_documents("shakespeare", "train")) and len(plays["train"]) == 35
    assert verify_shards(out) == []


def test_real_moses_subset_and_gpt2(workdir):
    moses_char = train_tokenizer("moses", "char", workdir / "moses-char")  # all 1.58 M SMILES: ~2 s
    out = workdir / "moses"
    manifest = shard_corpus("moses", moses_char.folder, 40, out, workers=1, max_chars=38, limit=500)
    assert manifest.corpus == "moses(limit=500, max_chars=38)" and manifest.stats["train_samples"] == 500
    assert manifest.content == "smiles"  # declared by the built-in
    molecules = {moses_char.decode_document(row) for row in read_split(out, "train")}
    assert molecules == set(iter_documents("moses", "train", max_chars=38, limit=500))
    gpt2 = train_tokenizer(None, "gpt2", workdir / "gpt2")
    text = workdir / "gpt2.txt"
    text.write_text("Hello world\n\nAnother document here.\n")
    manifest = shard_corpus(str(text), gpt2.folder, 4, workdir / "gpt2-shards", workers=1, val_fraction=0.0)
    assert (manifest.dtype, manifest.vocab_size, manifest.packing) == ("uint16", 50258, "pack")
    rows = read_split(workdir / "gpt2-shards", "train")
    stream = [15496, 995, 50256] + gpt2.encode("Another document here.") + [50256]
    assert Counter(map(tuple, rows.tolist())) == Counter(
        (50256, *stream[i: i + 2], 50256) for i in range(0, len(stream) - 1, 2))


# ---------------------------------------------------------------------------------------------
# Errors and verification


def test_bad_input_errors_leave_nothing(workdir, tmp_path, text_corpus, smiles_corpus, bpe, char):
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match="neither a built-in"):
        shard_corpus(str(tmp_path / "absent.txt"), bpe.folder, 32, out, workers=1)
    with pytest.raises(TokenizerError, match="not a tokenizer folder"):
        shard_corpus(str(text_corpus), tmp_path / "no-tokenizer", 32, out, workers=1)
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text('{"kind": "sentencepiece"}')
    with pytest.raises(TokenizerError, match="unreadable or incomplete"):
        shard_corpus(str(text_corpus), broken, 32, out, workers=1)
    with pytest.raises(ShardingError, match="at least 3"):
        shard_corpus(str(text_corpus), bpe.folder, 2, out, workers=1)
    with pytest.raises(ShardingError, match=r"--seq-len 5 truncates .* --seq-len \d+ fits every document"):
        shard_corpus(str(smiles_corpus), char.folder, 5, out, workers=1, line_documents=True)
    with pytest.raises(ShardingError, match="too few for one packed sample"):
        shard_corpus(str(text_corpus), bpe.folder, 100_000, out, workers=1)
    (tmp_path / "empty.txt").write_text("\n\n\n")
    with pytest.raises(CorpusError, match="no training documents"):
        shard_corpus(str(tmp_path / "empty.txt"), bpe.folder, 32, out, workers=1)
    (tmp_path / "odd.txt").write_text("CCO\nCCZ\nCCN\n")
    with pytest.raises(UnknownCharacterError, match="'Z'"):  # raised inside a worker process
        shard_corpus(str(tmp_path / "odd.txt"), char.folder, 16, out, workers=2, line_documents=True)
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_and_failure_midway(workdir, tmp_path, text_corpus, bpe, monkeypatch):
    out = tmp_path / "out"
    first = shard_corpus(str(text_corpus), bpe.folder, 32, out, workers=1)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        shard_corpus(str(text_corpus), bpe.folder, 32, out, workers=1)
    # A crash after some shards were written leaves the previous output untouched and no temporary folder.
    monkeypatch.setattr(tasks_module, "write_manifest", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        shard_corpus(str(text_corpus), bpe.folder, 64, out, workers=1, overwrite=True)
    monkeypatch.undo()
    assert read_manifest(out) == first and leftovers(tmp_path) == []
    second = shard_corpus(str(text_corpus), bpe.folder, 64, out, workers=1, overwrite=True)
    assert read_manifest(out).seq_len == second.seq_len == 64 and verify_shards(out) == []
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "data.bin").write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="does not look like"):
        shard_corpus(str(text_corpus), bpe.folder, 32, stranger, workers=1, overwrite=True)
    assert (stranger / "data.bin").read_bytes() == b"precious"


def test_verify_finds_damage(workdir, tmp_path, text_corpus, bpe):
    out = tmp_path / "shards"
    manifest = shard_corpus(str(text_corpus), bpe.folder, 32, out, samples_per_shard=100, workers=1)
    first, second = manifest.splits["train"].shards[:2]
    data = bytearray((out / first.path).read_bytes())
    data[2000] ^= 0xFF
    (out / first.path).write_bytes(bytes(data))
    (out / second.path).write_bytes((out / second.path).read_bytes()[:-512])
    (out / manifest.splits["val"].shards[0].path).unlink()
    config = json.loads((out / "tokenizer" / CONFIG_FILE).read_text())
    config["mask_id"] = 5
    (out / "tokenizer" / CONFIG_FILE).write_text(json.dumps(config))
    problems = "\n".join(verify_shards(out))
    assert f"{first.path}: sha256 differs" in problems
    assert f"{second.path}: {second.bytes - 512} bytes" in problems
    assert "val/shard-000000-0000.tar: missing" in problems
    assert "tokenizer/: sha256" in problems
    assert verify_shards(tmp_path / "nothing") and "not a shard folder" in verify_shards(tmp_path / "nothing")[0]

    parser = argparse.ArgumentParser(prog="proseco")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokenizer", "verify", str(out)])
    with pytest.raises(UserError, match="4 problem"):
        args.func(args)


def test_cli_shard_one_line_error(tmp_path, bpe):
    from pretrain.cli import main

    assert main(["tokenizer", "shard", "--corpus", "moses", "--tokenizer", str(bpe.folder), "--seq-len", "8",
                 "--out", str(tmp_path / "out"), "--val-fraction", "0.5"]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seq_len, dtype, count, first_key", [(64, "uint16", 300, 0),
                                                               (33, "uint32", 77, 999_999_000_000),
                                                               (128, "uint16", 1, 4096)])
def test_fast_shard_writer_is_byte_identical_to_webdataset(tmp_path, seq_len, dtype, count, first_key):
    """The vectorised writer produces exactly the tar webdataset's TarWriter writes."""
    import io
    import tarfile as tar

    samples = np.random.default_rng(seq_len).integers(0, 60_000, (count, seq_len)).astype(dtype)
    reference = io.BytesIO()
    writer = wds.TarWriter(reference, mtime=0, format=tar.USTAR_FORMAT, encoder=False)
    for i, row in enumerate(samples):
        buffer = io.BytesIO()
        np.save(buffer, row, allow_pickle=False)
        writer.write({"__key__": f"{first_key + i:012d}", "tokens.npy": buffer.getvalue()})
    writer.close()
    info = write_shard(tmp_path / "shard.tar", samples, first_key)
    assert (tmp_path / "shard.tar").read_bytes() == reference.getvalue()
    assert info.bytes == len(reference.getvalue()) and info.samples == count
