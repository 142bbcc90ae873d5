"""Sharding at scale: JSONL, JSONL.zst and Parquet corpora, chunked streaming, N tasks + merge,
a killed task that resumes, migration of v1 folders, SentencePiece on a bounded sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pretrain.data import TrainLoader
from tests.test_data import take
from tests.test_tokenizer import write_text_corpus
from tokenizer.corpora import iter_documents
from tokenizer.format import FORMAT_V1, FORMAT_V2, MANIFEST, read_manifest
from tokenizer.shard import merge_shards, migrate_shards, shard_corpus, shard_task, verify_shards
from tokenizer.tasks import KEY_SPAN, ShardingError
from tokenizer.train import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 8_000
"""Characters per chunk in these tests: the corpus below makes about 20 chunks per split."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The same documents as JSONL, JSONL.zst and Parquet, and a char tokenizer for them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path_factory.mktemp("corpus")
    docs = write_text_corpus(root / "text.txt", documents=700)
    lines = "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    (root / "docs.jsonl").write_bytes(lines)
    (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"body": docs, "id": list(range(len(docs)))}), root / "docs.parquet", row_group_size=64)
    tokenizer = train_tokenizer(str(root / "text.txt"), "char", root / "tok", val_fraction=0.0)
    return {"root": root, "docs": docs, "tokenizer": tokenizer.folder}


OPTIONS = dict(text_field="body", samples_per_shard=50, chunk_chars=CHUNK, val_fraction=0.05, packing="pack")


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".tasks" not in p.parts}


def test_jsonl_zst_and_parquet_stream_the_same_documents_and_shards(corpus: dict, tmp_path: Path) -> None:
    root = corpus["root"]
    for split in ("train", "val"):
        reference = list(iter_documents(str(root / "docs.jsonl"), split, "body", val_fraction=0.05))
        assert reference and sum(map(len, reference)) > 0
        for name in ("docs.jsonl.zst", "docs.parquet"):
            assert list(iter_documents(str(root / name), split, "body", val_fraction=0.05)) == reference
    built = {}
    for name in ("docs.jsonl", "docs.parquet"):
        manifest = shard_corpus(str(root / name), corpus["tokenizer"], 24, tmp_path / name, workers=1, **OPTIONS)
        assert manifest.format == FORMAT_V2 and verify_shards(tmp_path / name) == []
        built[name] = files(tmp_path / name)
    # Only the manifest's corpus description (the file name) differs.
    assert {k: v for k, v in built["docs.jsonl"].items() if k != MANIFEST} == \
        {k: v for k, v in built["docs.parquet"].items() if k != MANIFEST}
    with pytest.raises(Exception, match="no column 'text'"):
        list(iter_documents(str(root / "docs.parquet"), "train"))


def test_chunks_bound_the_work_and_keys_increase(corpus: dict, tmp_path: Path) -> None:
    manifest = shard_corpus(str(corpus["root"] / "docs.jsonl"), corpus["tokenizer"], 24, tmp_path / "out",
                            workers=2, **OPTIONS)
    train = manifest.splits["train"].shards
    chunks = sorted({int(s.path.split("-")[1]) for s in train})
    assert len(chunks) >= 10 and chunks == list(range(len(chunks)))  # ~8,000 characters each
    assert all(s.first_key // KEY_SPAN == int(s.path.split("-")[1]) for s in train)
    # Every sample of the split is there once: packed within each chunk, tails dropped per chunk.
    assert manifest.splits["train"].samples == manifest.stats["train_samples"] == sum(s.samples for s in train)
    single = shard_corpus(str(corpus["root"] / "docs.jsonl"), corpus["tokenizer"], 24, tmp_path / "one",
                          workers=1, **OPTIONS)
    assert single == manifest and files(tmp_path / "one") == files(tmp_path / "out")  # workers do not matter
    assert not (tmp_path / "out" / ".tasks").exists()


def test_n_tasks_and_merge_equal_one_task(corpus: dict, tmp_path: Path) -> None:
    source = str(corpus["root"] / "docs.jsonl.zst")
    whole = shard_corpus(source, corpus["tokenizer"], 24, tmp_path / "whole", workers=1, **OPTIONS)
    out = tmp_path / "tasks"
    with pytest.raises(ShardingError, match="no sharding tasks"):
        merge_shards(out)
    counts = [shard_task(source, corpus["tokenizer"], 24, out, task_index=i, num_tasks=3, workers=1, **OPTIONS)
              for i in (2, 0)]
    with pytest.raises(ShardingError, match=r"chunks are not written yet .* task c % N"):
        merge_shards(out)
    counts.append(shard_task(source, corpus["tokenizer"], 24, out, task_index=1, num_tasks=3, workers=1, **OPTIONS))
    assert sum(c["written"] for c in counts) == len({(name, s.path.split("-")[1])
                                                     for name, split in whole.splits.items() for s in split.shards})
    merged = merge_shards(out)
    assert merged == whole and files(out) == files(tmp_path / "whole")
    shard_task(source, corpus["tokenizer"], 24, tmp_path / "other", task_index=0, num_tasks=2, workers=1, **OPTIONS)
    with pytest.raises(ShardingError, match="different seed"):
        shard_task(source, corpus["tokenizer"], 24, tmp_path / "other", task_index=1, num_tasks=2, workers=1,
                   **{**OPTIONS, "seed": 5})


def test_killed_task_resumes_without_redoing_finished_chunks(corpus: dict, tmp_path: Path) -> None:
    """SIGKILL a real `proseco tokenizer shard --task-index` process midway, run it again, merge."""
    out = tmp_path / "out"
    command = [str(Path(sys.executable).with_name("proseco")), "tokenizer", "shard",
               "--corpus", str(corpus["root"] / "docs.jsonl"), "--text-field", "body", "--tokenizer",
               str(corpus["tokenizer"]), "--seq-len", "24", "--packing", "pack", "--samples-per-shard", "50",
               "--chunk-mib", str(CHUNK / (1 << 20) / 4), "--val-fraction", "0.05", "--workers", "1",
               "--out", str(out), "--task-index", "0", "--num-tasks", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list((out / ".tasks").glob("train-*.json"))) < 5 and process.poll() is None:
        assert time.monotonic() < deadline, "the task wrote no chunk records within 60 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = {p.name for p in (out / ".tasks").glob("*-0*.json")}  # chunk records of both splits
    written = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for split in ("train", "val") if (out / split).is_dir()
               for p in (out / split).iterdir() if f"{split}-{p.name.split('-')[1]}.json" in finished}
    with pytest.raises(ShardingError, match="not written yet|no task has read the whole"):
        merge_shards(out)
    options = {**OPTIONS, "chunk_chars": int(CHUNK / 4)}
    counts = shard_task(str(corpus["root"] / "docs.jsonl"), corpus["tokenizer"], 24, out, task_index=0,
                        num_tasks=1, workers=1, **options)
    assert counts["skipped"] == len(finished) >= 5 and counts["written"] > 0, "killed too late to test a resume"
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in written} == written  # not rewritten
    merged = merge_shards(out)
    whole = shard_corpus(str(corpus["root"] / "docs.jsonl"), corpus["tokenizer"], 24, tmp_path / "whole",
                         workers=1, **options)
    assert merged == whole and files(out) == files(tmp_path / "whole")


def test_migrate_v1_to_v2_keeps_every_token_and_batch(corpus: dict, tmp_path: Path) -> None:
    source = str(corpus["root"] / "docs.jsonl")
    v1 = shard_corpus(source, corpus["tokenizer"], 24, tmp_path / "v1", workers=1, shard_format=FORMAT_V1, **OPTIONS)
    migrated = migrate_shards(tmp_path / "v1", tmp_path / "v2")
    assert migrated.format == FORMAT_V2 and v1.format == FORMAT_V1 and verify_shards(tmp_path / "v2") == []
    assert read_manifest(tmp_path / "v2") == migrated
    assert [(s.path, s.samples, s.first_key) for s in migrated.splits["train"].shards] == \
        [(s.path, s.samples, s.first_key) for s in v1.splits["train"].shards]
    size = {name: sum(p.stat().st_size for p in (tmp_path / name / "train").iterdir()) for name in ("v1", "v2")}
    assert size["v2"] * 4 < size["v1"]  # 8 bytes of headers per token fall away at seq_len 24
    batches = {}
    for name in ("v1", "v2"):
        loader = TrainLoader(tmp_path / name, global_batch_size=8, micro_batch_size=4, num_workers=0, seed=2)
        batches[name] = np.stack([item["tokens"].numpy() for step in take(loader, 30) for item in step])
    assert np.array_equal(batches["v1"], batches["v2"])
    # Freshly sharded v2 holds the same samples under the same keys as the migrated folder.
    fresh = shard_corpus(source, corpus["tokenizer"], 24, tmp_path / "fresh", workers=1, **OPTIONS)
    assert files(tmp_path / "fresh").keys() == files(tmp_path / "v2").keys()
    assert all(files(tmp_path / "fresh")[k] == v for k, v in files(tmp_path / "v2").items() if k != MANIFEST)
    assert fresh.fingerprint == migrated.fingerprint


def test_sentencepiece_trains_on_a_bounded_sample(corpus: dict, tmp_path: Path) -> None:
    text = str(corpus["root"] / "text.txt")
    bounded = train_tokenizer(text, "bpe", tmp_path / "bounded", 400, max_train_chars=20_000, sample_sentences=200)
    trained_on = json.loads((tmp_path / "bounded" / "tokenizer.json").read_text())["info"]["trained_on"]
    assert 20_000 <= trained_on["characters"] < 20_000 + max(map(len, corpus["docs"]))
    full = json.loads((train_tokenizer(text, "bpe", tmp_path / "full", 400).folder / "tokenizer.json").read_text())
    assert full["info"]["trained_on"]["characters"] > 5 * trained_on["characters"]
    assert all(bounded.decode(bounded.encode(doc)) == doc for doc in corpus["docs"][:50])  # still lossless


def test_partial_files_a_killed_task_left_are_removed_when_its_chunk_is_written(corpus: dict, tmp_path: Path) -> None:
    """A SIGKILL during a write leaves NAME.tmp-*; the chunk is not done, so the next run writes it
    again and removes what was left (only of its own chunks: other tasks may be writing theirs)."""
    out = tmp_path / "out"
    for stale in ("train/shard-000000-0000.tar.tmp-0123456789ab", ".tasks/train-000000.json.tmp-0123456789ab"):
        (out / stale).parent.mkdir(parents=True, exist_ok=True)
        (out / stale).write_bytes(b"half a shard")
    source = str(corpus["root"] / "docs.jsonl")
    shard_task(source, corpus["tokenizer"], 24, out, task_index=0, num_tasks=1, workers=1, **OPTIONS)
    merge_shards(out)
    whole = tmp_path / "whole"
    shard_corpus(source, corpus["tokenizer"], 24, whole, workers=1, **OPTIONS)
    assert files(out) == files(whole) and not list(out.rglob("*.tmp-*"))
