"""The streaming loader: exactly-once epochs, exact resume across layouts, validation, damage.

Shard folders are written directly with `tokenizer.format` from token rows that encode their
sample id (row[0] = id, the rest a function of it), so every check is made on the stored tokens,
not only on the positions the loader reports.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data import EpochOrder, TrainLoader, eval_batches, open_split
from tokenizer.format import (
    FORMAT_V1,
    FORMAT_V2,
    TAR_BLOCK,
    Geometry,
    Manifest,
    ShardError,
    ShardReader,
    SplitInfo,
    member_stride,
    npy_header_size,
    write_manifest,
    write_shard,
)

pytestmark = pytest.mark.timeout(120)  # a loader that hangs fails instead of blocking CI

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 16
VAL_BASE = 40_000
"""Sample ids of the val split start here, so a train/val mix-up shows in the tokens."""


def sample_rows(ids: np.ndarray, seq_len: int = SEQ_LEN) -> np.ndarray:
    """Token rows of the given sample ids: row[0] = id, row[j] = (7 * id + 13 * j) % 65521."""
    ids = np.asarray(ids, dtype=np.int64)
    rows = (7 * ids[:, None] + 13 * np.arange(seq_len)[None, :]) % 65521
    rows[:, 0] = ids
    return rows


def decode(tokens: torch.Tensor) -> list[int]:
    """Sample ids of token rows, checking that every row is intact."""
    array = tokens.numpy()
    assert (array == sample_rows(array[:, 0], array.shape[1])).all(), "token rows do not match their sample ids"
    return array[:, 0].tolist()


def make_shard_folder(tmp_path: Path, samples_per_shard: list[int], seq_len: int = SEQ_LEN,
                      val_samples_per_shard: list[int] | None = None, tokenizer_sha256: str = "tok0",
                      name: str = "shards", vocab_size: int = 65536, block_samples: int | None = None) -> Path:
    """A shard folder as `proseco tokenizer shard` writes it; train ids 0.., val ids VAL_BASE..
    v1 (one sample per member) by default, v2 with `block_samples` samples per member if given."""
    folder = tmp_path / name
    folder.mkdir()
    geometry = Geometry(seq_len, "uint16", block_samples or 1, blocked=block_samples is not None)
    splits = {}
    for split, sizes, base in (("train", samples_per_shard, 0), ("val", val_samples_per_shard, VAL_BASE)):
        if sizes is None:
            continue
        info = SplitInfo()
        key = 0
        for index, size in enumerate(sizes):
            rel = f"{split}/shard-{index:06d}.tar"
            shard = write_shard(folder / rel, sample_rows(np.arange(base + key, base + key + size), seq_len)
                                .astype(np.uint16), first_key=key, geometry=geometry)
            shard.path = rel
            info.shards.append(shard)
            info.samples += size
            key += size
        splits[split] = info
    write_manifest(folder, Manifest(seq_len=seq_len, dtype="uint16", packing="pack", corpus="test",
                                    tokenizer_sha256=tokenizer_sha256, vocab_size=vocab_size, splits=splits,
                                    format=FORMAT_V2 if block_samples else FORMAT_V1,
                                    block_samples=block_samples or 1))
    return folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """45 train samples in 5 uneven shards (5 does not divide ranks x workers); 23 val samples."""
    return make_shard_folder(tmp_path, [7, 13, 5, 11, 9], val_samples_per_shard=[10, 13])


def take(loader: TrainLoader, steps: int) -> list[list[dict]]:
    """`steps` optimizer steps of micro-batches from a fresh iteration of the loader."""
    iterator = iter(loader)
    return [[next(iterator) for _ in range(loader.accum_steps)] for _ in range(steps)]


def global_batches(folder: Path, steps: int, *, dp: int, mb: int, gbs: int, workers: int = 0,
                   state: dict | None = None, **kwargs) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """The global batches (positions, sample ids: ranks in rank order) of `steps` steps, and the end state."""
    per_rank, states = [], []
    for rank in range(dp):
        loader = TrainLoader(folder, global_batch_size=gbs, micro_batch_size=mb, dp_rank=rank, dp_size=dp,
                             num_workers=workers, **kwargs)
        if state is not None:
            loader.load_state_dict(state)
        per_rank.append(take(loader, steps))
        states.append(loader.state_dict())
    assert all(s == states[0] for s in states)
    batches = []
    for step in range(steps):
        items = [item for rank in range(dp) for item in per_rank[rank][step]]
        batches.append(([p for item in items for p in item["position"].tolist()],
                        [i for item in items for i in decode(item["tokens"])]))
    return batches, states[0]


def epoch_ids(batches: list[tuple[list[int], list[int]]], epoch: int, samples: int) -> list[int]:
    return [i for positions, ids in batches for p, i in zip(positions, ids) if p // samples == epoch]


# ---------------------------------------------------------------------------------------------
# Order and exactly-once


def test_epoch_order_covers_every_sample_once_and_wraps_rotations() -> None:
    counts = [7, 0, 13, 5, 11, 9]
    order = EpochOrder(counts, seed=3, shuffle=True)
    for epoch in range(3):
        seen = Counter()
        for start in range(0, order.samples, 4):  # ranges that cut shards and rotations anywhere
            stop = min(order.samples, start + 4)
            pieces = order.pieces(epoch * order.samples + start, epoch * order.samples + stop)
            assert sum(p.stop - p.start for p in pieces) == stop - start
            seen.update((p.shard, s) for p in pieces for s in range(p.start, p.stop))
        assert seen == Counter({(shard, s): 1 for shard, n in enumerate(counts) for s in range(n)})
    # one read of a whole epoch has at most two pieces per shard (rotation wrap)
    pieces = order.pieces(0, order.samples)
    assert max(Counter(p.shard for p in pieces).values()) <= 2
    assert any(p.start > 0 for p in pieces), "no shard was rotated"


@pytest.mark.parametrize("workers", [0, 2])
def test_exactly_once_per_epoch_across_ranks_and_workers(folder: Path, workers: int) -> None:
    dp, mb, gbs = 3, 2, 12  # 2 accumulation steps; 3 ranks x 2 workers = 6 > 5 shards
    batches, state = global_batches(folder, 8, dp=dp, mb=mb, gbs=gbs, workers=workers, seed=5)
    for step, (positions, _) in enumerate(batches):
        assert positions == list(range(step * gbs, (step + 1) * gbs))  # rank-major, micro order
    for epoch in (0, 1):  # 96 positions: epochs 0 and 1 complete, the batch at 36..47 straddles
        assert sorted(epoch_ids(batches, epoch, 45)) == list(range(45))
    assert state["position"] == 8 * gbs and state["step"] == 8


def test_rank_reads_its_contiguous_slice(folder: Path) -> None:
    loader = TrainLoader(folder, global_batch_size=12, micro_batch_size=2, dp_rank=1, dp_size=2, num_workers=0)
    steps = take(loader, 2)
    for step, items in enumerate(steps):
        assert [(item["step"], item["micro"]) for item in items] == [(step, m) for m in range(3)]
        positions = torch.cat([item["position"] for item in items]).tolist()
        assert positions == list(range(step * 12 + 6, step * 12 + 12))
        for item in items:
            assert item["tokens"].dtype == torch.int64 and item["tokens"].shape == (2, SEQ_LEN)
            assert item["valid"].dtype == torch.bool and item["valid"].all() and item["corrupt"] == 0


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_same_layout(folder: Path) -> None:
    full, _ = global_batches(folder, 7, dp=2, mb=2, gbs=8, workers=1)
    head, state = global_batches(folder, 3, dp=2, mb=2, gbs=8, workers=1)
    tail, _ = global_batches(folder, 4, dp=2, mb=2, gbs=8, workers=1, state=state)
    assert head + tail == full


def test_resume_on_other_dp_and_micro_batch(folder: Path) -> None:
    full, _ = global_batches(folder, 7, dp=2, mb=2, gbs=8)
    _, state = global_batches(folder, 3, dp=2, mb=2, gbs=8)
    assert global_batches(folder, 4, dp=4, mb=1, gbs=8, state=state)[0] == full[3:]
    assert global_batches(folder, 4, dp=1, mb=4, gbs=8, state=state)[0] == full[3:]


def test_resume_on_other_worker_count(folder: Path) -> None:
    full, _ = global_batches(folder, 6, dp=2, mb=1, gbs=4, workers=0)
    _, state = global_batches(folder, 2, dp=2, mb=1, gbs=4, workers=0)
    assert global_batches(folder, 4, dp=2, mb=1, gbs=4, workers=2, state=state)[0] == full[2:]


def test_resume_across_epoch_boundary_and_with_a_new_batch_size(folder: Path) -> None:
    full, _ = global_batches(folder, 12, dp=1, mb=4, gbs=8)
    _, state = global_batches(folder, 5, dp=1, mb=4, gbs=8)  # next batch: positions 40..47 straddle 45
    assert state["position"] == 40
    tail, _ = global_batches(folder, 7, dp=1, mb=4, gbs=8, state=state)
    assert tail == full[5:]
    assert sorted(epoch_ids(full, 1, 45)) == list(range(45))
    # a different global batch size starts its batches at the saved position
    smaller, _ = global_batches(folder, 3, dp=2, mb=2, gbs=4, state=state)
    assert [p for positions, _ in smaller for p in positions] == list(range(40, 52))
    assert [i for _, ids in smaller for i in ids] == full[5][1] + full[6][1][:4]


def test_resume_keeps_the_saved_order_when_the_seed_changes(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    full, _ = global_batches(folder, 4, dp=1, mb=4, gbs=4, seed=7)
    _, state = global_batches(folder, 2, dp=1, mb=4, gbs=4, seed=7)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        tail, _ = global_batches(folder, 2, dp=1, mb=4, gbs=4, seed=8, state=state)
    assert tail == full[2:]
    assert "seed=7 shuffle=True (saved), not seed=8" in caplog.text


def test_state_dict_mid_accumulation_is_refused(folder: Path) -> None:
    loader = TrainLoader(folder, global_batch_size=8, micro_batch_size=2, num_workers=0)
    iterator = iter(loader)
    next(iterator)
    with pytest.raises(RuntimeError, match="micro-batch 1 of 4"):
        loader.state_dict()
    for _ in range(3):
        next(iterator)
    assert loader.state_dict()["position"] == 8


def test_load_state_dict_makes_old_iterators_stale(folder: Path) -> None:
    loader = TrainLoader(folder, global_batch_size=2, micro_batch_size=2, num_workers=0)
    iterator = iter(loader)
    next(iterator)
    loader.load_state_dict({**loader.state_dict(), "position": 20})
    with pytest.raises(RuntimeError, match="stale"):
        next(iterator)
    assert next(iter(loader))["position"].tolist() == [20, 21]


# ---------------------------------------------------------------------------------------------
# Shuffling


def test_shuffle_orders(folder: Path) -> None:
    def order(seed: int, shuffle: bool = True) -> list[int]:
        batches, _ = global_batches(folder, 9, dp=1, mb=10, gbs=10, seed=seed, shuffle=shuffle)
        return [i for _, ids in batches for i in ids]  # 90 positions: epochs 0 and 1

    first = order(seed=1)
    assert first[:45] != first[45:90], "epochs 0 and 1 have the same order"
    assert sorted(first[:45]) == sorted(first[45:90]) == list(range(45))
    assert order(seed=1) == first
    assert order(seed=2) != first
    assert order(seed=1, shuffle=False) == list(range(45)) * 2  # manifest order every epoch


# ---------------------------------------------------------------------------------------------
# Validation


def test_validation_pass(folder: Path) -> None:
    dp, mb = 3, 2  # 23 samples over 3 ranks x 2 = ceil(23 / 6) = 4 batches each, 1 padding slot
    seen: Counter = Counter()
    padding = 0
    for rank in range(dp):
        batches = eval_batches(folder, micro_batch_size=mb, dp_rank=rank, dp_size=dp)
        items = list(batches)
        assert len(items) == len(batches) == 4
        for k, item in enumerate(items):
            first = (k * dp + rank) * mb
            expected = [p % 23 for p in range(first, first + mb)]
            assert item["position"].tolist() == expected and item["step"] == k
            ids = decode(item["tokens"])
            assert ids == [VAL_BASE + p for p in expected]  # padding repeats real samples
            assert item["valid"].tolist() == [p < 23 for p in range(first, first + mb)]
            seen.update(i for i, ok in zip(ids, item["valid"].tolist()) if ok)
            padding += int((~item["valid"]).sum())
            assert item["corrupt"] == 0  # padding is not damage
        assert batches.corrupt_samples == 0
    assert seen == Counter({VAL_BASE + i: 1 for i in range(23)})
    assert padding == 1
    limited = eval_batches(folder, micro_batch_size=mb, dp_rank=1, dp_size=dp, max_samples=2 * dp * mb, num_workers=2)
    assert [item["step"] for item in limited] == [0, 1] and len(limited) == 2
    # The same samples on every layout: the first 10 of the split at dp=1, 2 or 3.
    for dp in (1, 2, 3):
        covered = [p for rank in range(dp) for item in eval_batches(folder, micro_batch_size=2, dp_rank=rank,
                                                                    dp_size=dp, max_samples=10)
                   for p, ok in zip(item["position"].tolist(), item["valid"].tolist()) if ok]
        assert sorted(covered) == list(range(10)), dp


def test_validation_with_more_ranks_than_samples(tmp_path: Path) -> None:
    folder = make_shard_folder(tmp_path, [4], val_samples_per_shard=[3])
    for rank in range(4):
        items = list(eval_batches(folder, micro_batch_size=2, dp_rank=rank, dp_size=4))
        assert len(items) == 1
        assert items[0]["valid"].tolist() == [2 * rank < 3, 2 * rank + 1 < 3]


# ---------------------------------------------------------------------------------------------
# Opening errors


def test_open_errors(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(ShardError, match="does not exist"):
        open_split(tmp_path / "nowhere")
    with pytest.raises(ShardError, match="no split 'test'.*train, val"):
        open_split(folder, "test")
    with pytest.raises(ShardError, match="tok0.*tok1.*re-shard"):
        open_split(folder, expected_tokenizer_sha256="tok1")
    open_split(folder, expected_tokenizer_sha256="tok0")
    (folder / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.json not found"):
        TrainLoader(folder, global_batch_size=2, micro_batch_size=2)
    empty = make_shard_folder(tmp_path, [], name="empty")
    with pytest.raises(ShardError, match="'train' of .* is empty"):
        open_split(empty)


def test_bad_layouts_are_refused(folder: Path) -> None:
    with pytest.raises(ValueError, match="not a positive multiple"):
        TrainLoader(folder, global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match="dp_rank=2"):
        TrainLoader(folder, global_batch_size=8, micro_batch_size=4, dp_rank=2, dp_size=2)


# ---------------------------------------------------------------------------------------------
# Damaged data


def flip_header_byte(folder: Path, shard: int, sample: int, split: str = "train") -> None:
    path = folder / f"{split}/shard-{shard:06d}.tar"
    data = bytearray(path.read_bytes())
    data[sample * member_stride(SEQ_LEN, "uint16") + 5] ^= 0x01  # inside the member name
    path.write_bytes(bytes(data))


def one_epoch(folder: Path, workers: int = 0, **kwargs) -> tuple[TrainLoader, list[dict]]:
    loader = TrainLoader(folder, global_batch_size=5, micro_batch_size=5, num_workers=workers, shuffle=False, **kwargs)
    iterator = iter(loader)
    return loader, [next(iterator) for _ in range(9)]  # 45 samples


@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_header_byte_invalidates_that_sample_only(folder: Path, workers: int,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    flip_header_byte(folder, shard=1, sample=3)  # shard 1 holds ids 7..19: id 10 is damaged
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        # Digests off: the per-sample checks alone (the digest would distrust the whole shard).
        loader, items = one_epoch(folder, workers=workers, max_corrupt_fraction=0.1, verify_digests=False)
    tokens = torch.cat([item["tokens"] for item in items])
    valid = torch.cat([item["valid"] for item in items])
    assert valid.tolist() == [i != 10 for i in range(45)]
    assert (tokens[10] == 0).all()
    keep = [i for i in range(45) if i != 10]
    assert decode(tokens[keep]) == keep
    assert loader.corrupt_samples == 1 and sum(item["corrupt"] for item in items) == 1
    if workers == 0:  # worker processes log to their own stderr
        assert "1 of 13 samples are unreadable" in caplog.text


def test_damaged_validation_sample_is_invalid_and_counted_once(folder: Path) -> None:
    flip_header_byte(folder, shard=0, sample=0, split="val")  # val position 0, repeated as padding
    valid: dict[int, bool] = {}
    total = 0
    for rank in range(3):
        batches = eval_batches(folder, micro_batch_size=2, dp_rank=rank, dp_size=3, max_corrupt_fraction=0.2,
                               verify_digests=False)
        for item in batches:
            for p, ok in zip(item["position"].tolist(), item["valid"].tolist()):
                valid[p] = valid.get(p, False) or ok
        total += batches.corrupt_samples
    assert valid == {p: p != 0 for p in range(23)}
    assert total == 1


def test_too_many_damaged_samples_raise(folder: Path) -> None:
    flip_header_byte(folder, shard=1, sample=3)
    with pytest.raises(ShardError, match=r"shard-000001.tar: 1 of 13 samples.*proseco tokenizer verify"):
        one_epoch(folder, workers=2, verify_digests=False)  # default max_corrupt_fraction 0.01; from a worker


def flip_token_byte(folder: Path, shard: int, sample: int) -> None:
    """Change one token of a sample, leaving its tar header (and so the per-sample checks) intact."""
    path = folder / f"train/shard-{shard:06d}.tar"
    data = bytearray(path.read_bytes())
    token_bytes = sample * member_stride(SEQ_LEN, "uint16") + TAR_BLOCK + npy_header_size(SEQ_LEN, "uint16")
    data[token_bytes + 2 * 5] ^= 0x01  # the low byte of token 5
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_altered_token_bytes_are_caught_by_the_shard_digest(folder: Path, workers: int,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    flip_token_byte(folder, shard=1, sample=3)  # shard 1 holds ids 7..19
    _, unchecked = one_epoch(folder, verify_digests=False)
    assert all(item["valid"].all() for item in unchecked)  # the damage parses: only the digest sees it
    altered = torch.cat([item["tokens"] for item in unchecked])[10]
    assert (altered != torch.from_numpy(sample_rows(np.array([10]))[0])).sum() == 1
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        loader, items = one_epoch(folder, workers=workers, max_corrupt_fraction=0.25)
    valid = torch.cat([item["valid"] for item in items])
    assert valid.tolist() == [not 7 <= i < 20 for i in range(45)]  # the whole shard is distrusted
    assert loader.corrupt_samples == 13
    if workers == 0:
        assert "shard-000001.tar: sha256" in caplog.text and "altered bytes" in caplog.text
    with pytest.raises(ShardError, match=r"shard-000001.tar: its sha256 differs from the manifest's"):
        one_epoch(folder, workers=workers)  # default max_corrupt_fraction 0.01: 1 of 5 shards is too many


def rewrite_shard(folder: Path, shard: int, rows: np.ndarray) -> None:
    """Replace a train shard by `rows`, updating the manifest (a consistent folder, as a buggy
    tokenizer would write it, not damage on disk)."""
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["splits"]["train"]["shards"][shard]
    info = write_shard(folder / entry["path"], rows.astype(np.uint16), first_key=entry["first_key"])
    entry.update(bytes=info.bytes, sha256=info.sha256)
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("workers", [0, 2])
def test_token_ids_outside_the_vocabulary_are_damage(tmp_path: Path, workers: int) -> None:
    folder = make_shard_folder(tmp_path, [7, 13, 5, 11, 9], vocab_size=65521)  # every row id < 65521
    rows = sample_rows(np.arange(7, 20))
    rows[3, 5] = 65530  # id 10 holds a token the embedding has no row for
    rewrite_shard(folder, 1, rows)
    loader, items = one_epoch(folder, workers=workers, max_corrupt_fraction=0.1)
    tokens, valid = torch.cat([item["tokens"] for item in items]), torch.cat([item["valid"] for item in items])
    assert valid.tolist() == [i != 10 for i in range(45)] and (tokens[10] == 0).all()
    assert int(tokens.max()) < 65521 and loader.corrupt_samples == 1
    with pytest.raises(ShardError, match=r"1 of 13 samples are unreadable or hold ids outside the vocabulary"):
        one_epoch(folder, workers=workers)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_shard_file_is_found_at_construction(folder: Path, damage: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = folder / "train/shard-000002.tar"  # ids 20..24
    if damage == "truncate":
        os.truncate(path, path.stat().st_size - 100)
    else:
        path.unlink()
    with pytest.raises(ShardError, match="1 of 5 train shards.*shard-000002.tar"):
        TrainLoader(folder, global_batch_size=5, micro_batch_size=5)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        loader, items = one_epoch(folder, max_corrupt_fraction=0.25)
    assert "shard-000002.tar" in caplog.text and loader.corrupt_shards == [path]
    valid = torch.cat([item["valid"] for item in items])
    assert valid.tolist() == [not 20 <= i < 25 for i in range(45)]
    keep = [i for i in range(45) if not 20 <= i < 25]
    assert decode(torch.cat([item["tokens"] for item in items])[keep]) == keep
    assert loader.corrupt_samples == 5


def test_fingerprint_mismatch_on_resume(tmp_path: Path, folder: Path) -> None:
    other = make_shard_folder(tmp_path, [7, 13, 5, 11, 8], name="other")
    loader = TrainLoader(folder, global_batch_size=4, micro_batch_size=4, num_workers=0)
    take(loader, 2)
    state = loader.state_dict()
    resumed = TrainLoader(other, global_batch_size=4, micro_batch_size=4, num_workers=0)
    with pytest.raises(ShardError, match=f"{state['fingerprint']}.*{resumed.manifest.fingerprint}.*ignore_fingerprint"):
        resumed.load_state_dict(state)
    resumed.load_state_dict(state, ignore_fingerprint=True)
    assert next(iter(resumed))["position"].tolist() == [8, 9, 10, 11]


# ---------------------------------------------------------------------------------------------
# Compact (v2) folders: blocks of samples per member


@pytest.mark.parametrize("dp, workers", [(1, 0), (2, 2)])
def test_compact_and_v1_folders_give_identical_batches(tmp_path: Path, dp: int, workers: int) -> None:
    sizes, val = [7, 13, 5, 11, 9], [10, 13]
    v1 = make_shard_folder(tmp_path, sizes, val_samples_per_shard=val, name="v1")
    v2 = make_shard_folder(tmp_path, sizes, val_samples_per_shard=val, name="v2", block_samples=4)
    assert open_split(v2)[0].format == FORMAT_V2 and open_split(v1)[0].format == FORMAT_V1
    kwargs = dict(dp=dp, mb=3, gbs=6, workers=workers, seed=5)
    batches_v1, state_v1 = global_batches(v1, 12, **kwargs)  # 72 positions: past one epoch of 45
    batches_v2, state_v2 = global_batches(v2, 12, **kwargs)
    assert batches_v1 == batches_v2 and state_v1["position"] == state_v2["position"]
    assert sorted(epoch_ids(batches_v2, 0, 45)) == list(range(45))
    for rank in range(dp):
        passes = [[(item["position"].tolist(), item["tokens"].tolist(), item["valid"].tolist())
                   for item in eval_batches(folder, micro_batch_size=4, dp_rank=rank, dp_size=dp, num_workers=workers)]
                  for folder in (v1, v2)]
        assert passes[0] == passes[1]
    # Smaller than the v1 folder by the per-sample headers (K = 4 here; 1 MiB members in real folders).
    size = {f: sum(p.stat().st_size for p in (f / "train").iterdir()) for f in (v1, v2)}
    assert size[v2] * 3 < size[v1]


def flip_block_header_byte(folder: Path, shard: int, block: int, block_samples: int) -> None:
    path = folder / f"train/shard-{shard:06d}.tar"
    data = bytearray(path.read_bytes())
    data[block * Geometry(SEQ_LEN, "uint16", block_samples, blocked=True).stride + 5] ^= 0x01  # the member name
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_block_header_invalidates_that_block(tmp_path: Path, workers: int) -> None:
    folder = make_shard_folder(tmp_path, [7, 13, 5, 11, 9], block_samples=4)
    flip_block_header_byte(folder, shard=1, block=1, block_samples=4)  # shard 1 holds ids 7..19: block 1 is 11..14
    loader, items = one_epoch(folder, workers=workers, max_corrupt_fraction=0.5, verify_digests=False)
    valid = torch.cat([item["valid"] for item in items])
    assert valid.tolist() == [not 11 <= i < 15 for i in range(45)]
    assert loader.corrupt_samples == 4
    keep = [i for i in range(45) if not 11 <= i < 15]
    assert decode(torch.cat([item["tokens"] for item in items])[keep]) == keep
    with pytest.raises(ShardError, match=r"shard-000001.tar: 4 of 13 samples are unreadable"):
        one_epoch(folder, workers=workers, verify_digests=False)


def test_read_deep_inside_a_block_fetches_its_header_apart(tmp_path: Path) -> None:
    """A read far from its block's start fetches the header as a second small range, and checks it."""
    folder = make_shard_folder(tmp_path, [5000], block_samples=4096)
    manifest, split = open_split(folder)
    reader = ShardReader(split.store, split.infos[0], split.geometry)
    stride = split.geometry.stride
    ranges = reader.ranges(4000, 4100)  # block 0 [0, 4096) and block 1 [4096, 5000)
    assert len(ranges) == 2 and ranges[0][0] == 0 and ranges[0][1] < 1024 and ranges[1][1] > stride
    tokens, ok = reader.read(4000, 4100)
    assert ok.all() and tokens[:, 0].tolist() == list(range(4000, 4100))
    assert (tokens == sample_rows(np.arange(4000, 4100))).all()
    data = bytearray((folder / split.infos[0].path).read_bytes())
    data[5] ^= 0x01  # block 0's member name
    (folder / split.infos[0].path).write_bytes(bytes(data))
    tokens, ok = ShardReader(split.store, split.infos[0], split.geometry).read(4000, 4100)
    assert ok.tolist() == [False] * 96 + [True] * 4
    # A file cut short inside block 1 delivers the rows it still holds.
    os.truncate(folder / split.infos[0].path, stride + 600)
    tokens, ok = ShardReader(split.store, split.infos[0], split.geometry).read(4094, 4100)
    assert ok.tolist() == [False, False, False, False, False, False]


# ---------------------------------------------------------------------------------------------
# Under torchrun: 2 ranks x 2 workers, then a single-process resume


@pytest.mark.distributed
def test_torchrun_two_ranks_two_workers_and_single_process_resume(tmp_path: Path, folder: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests/dist/loader_worker.py"), str(folder), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    config, state = ranks[0]["config"], ranks[0]["state"]
    assert ranks[1]["state"] == state and state["position"] == config["resume_step"] * config["gbs"]
    steps = config["steps"]
    # global batch of each step: rank 0's micro-batches, then rank 1's
    batches = [([p for r in ranks for p in r["positions"][s]], [i for r in ranks for i in r["ids"][s]])
               for s in range(steps)]
    for s, (positions, _) in enumerate(batches):
        assert positions == list(range(s * config["gbs"], (s + 1) * config["gbs"]))
    assert sorted(epoch_ids(batches, 0, 45)) == list(range(45))
    resumed, _ = global_batches(folder, steps - config["resume_step"], dp=1, mb=4, gbs=config["gbs"], state=state,
                                seed=config["seed"])
    assert resumed == batches[config["resume_step"]:]


# ---------------------------------------------------------------------------------------------
# Conditioning labels (data.labels)


def write_labels(folder: Path, name: str = "mod3", fingerprint: str | None = None) -> None:
    """A label set whose class is the sample's index in its split (manifest order) mod 3."""
    import io

    from pretrain.data.labels import label_files
    from tokenizer.format import read_manifest

    manifest = read_manifest(folder)
    info_path, _ = label_files(name, "train")
    (folder / info_path).parent.mkdir(parents=True)
    (folder / info_path).write_text(json.dumps({"num_classes": 3, "fingerprint": fingerprint or manifest.fingerprint}))
    for split, info in manifest.splits.items():
        buffer = io.BytesIO()
        np.save(buffer, (np.arange(info.samples) % 3).astype(np.uint8))
        (folder / label_files(name, split)[1]).write_bytes(buffer.getvalue())


@pytest.mark.parametrize("workers", [0, 2])
def test_labels_travel_with_their_samples_on_every_layout_and_resume(folder: Path, workers: int) -> None:
    write_labels(folder)
    for dp in (1, 2):
        for rank in range(dp):
            loader = TrainLoader(folder, global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=dp,
                                 num_workers=workers, labels="mod3")
            items = [item for step in take(loader, 7) for item in step]  # past the end of an epoch
            state = loader.state_dict()
            for item in items:
                assert item["label"].dtype == torch.int64
                assert item["label"].tolist() == [i % 3 for i in decode(item["tokens"])]
            resumed = TrainLoader(folder, global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=dp,
                                  num_workers=workers, labels="mod3")
            resumed.load_state_dict(state)
            item = next(iter(resumed))
            assert item["label"].tolist() == [i % 3 for i in decode(item["tokens"])]
    for item in eval_batches(folder, micro_batch_size=4, dp_size=2, dp_rank=1, num_workers=workers, labels="mod3"):
        assert item["label"].tolist() == [(i - VAL_BASE) % 3 for i in decode(item["tokens"])]


def test_missing_or_foreign_labels_are_refused_with_the_fix(folder: Path) -> None:
    from pretrain.data.labels import LabelError

    with pytest.raises(LabelError, match="proseco label"):
        TrainLoader(folder, global_batch_size=8, micro_batch_size=2, labels="qed")
    write_labels(folder, "old", fingerprint="made-from-other-shards")
    with pytest.raises(LabelError, match="computed from other shards.*--overwrite"):
        TrainLoader(folder, global_batch_size=8, micro_batch_size=2, labels="old")
    assert "label" not in next(iter(TrainLoader(folder, global_batch_size=8, micro_batch_size=2)))
