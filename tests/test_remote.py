"""Shard folders read by URL from real servers on loopback: nginx (HTTP range requests) and moto's
S3 server. The same batches bit for bit as the local folder, exact resume, retries and a clear
error when the server goes away, damage counted as locally, upload and read-back."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from pretrain.data import TrainLoader, eval_batches, open_shards
from tests.servers import MotoS3, Nginx
from tests.test_data import decode, epoch_ids, flip_block_header_byte, global_batches, make_shard_folder, take
from tokenizer.format import read_manifest
from tokenizer.storage import ReadPolicy, StorageError

pytestmark = pytest.mark.timeout(180)

FAST = ReadPolicy(timeout_s=5.0, retries=2, backoff_s=0.05)
"""Retries that give up within a second when the server is gone."""


def started_nginx(tmp_path: Path) -> Nginx:
    """nginx serving tmp_path/www on loopback, or the test skipped with the reason it cannot start."""
    server = Nginx(tmp_path / "www", tmp_path / "nginx")
    try:
        server.start()
    except RuntimeError as err:
        pytest.skip(f"no HTTP server on loopback: {err}")
    return server


@pytest.fixture
def served(tmp_path: Path):
    """A v2 shard folder under tmp_path/www and nginx serving tmp_path/www; yields (folder, url, server)."""
    (tmp_path / "www").mkdir()
    folder = make_shard_folder(tmp_path / "www", [7, 13, 5, 11, 9], val_samples_per_shard=[10, 13], block_samples=4)
    server = started_nginx(tmp_path)
    try:
        yield folder, f"{server.url}/shards", server
    finally:
        server.stop()


def test_http_batches_equal_local_on_one_and_two_ranks_with_workers_and_resume(served) -> None:
    folder, url, _ = served
    assert read_manifest(url) == read_manifest(folder)
    for dp, workers in ((1, 0), (2, 2)):
        local, local_state = global_batches(folder, 10, dp=dp, mb=2, gbs=8, workers=workers, seed=3)
        remote, remote_state = global_batches(url, 10, dp=dp, mb=2, gbs=8, workers=workers, seed=3, prefetch=3)
        assert remote == local and remote_state == local_state
        assert sorted(epoch_ids(remote, 0, 45)) == list(range(45))
        # Resume from step 4's state on the other layout: the same steps 4..9.
        _, state = global_batches(url, 4, dp=dp, mb=2, gbs=8, workers=workers, seed=3)
        resumed, _ = global_batches(url, 6, dp=3 - dp, mb=1, gbs=8, workers=2 - workers, seed=3, state=state)
        assert resumed == local[4:]
    # Validation reads the same over the URL too.
    for rank in range(2):
        passes = [[(item["position"].tolist(), item["tokens"].tolist())
                   for item in eval_batches(where, micro_batch_size=3, dp_rank=rank, dp_size=2, num_workers=1)]
                  for where in (folder, url)]
        assert passes[0] == passes[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_http_server_killed_midrun_retries_then_names_the_url_and_resumes_from_the_saved_state(
        served, caplog: pytest.LogCaptureFixture, workers: int) -> None:
    """With workers on (a user's default) the worker's error reaches the training process, naming
    the URL, instead of a hang; the retry warnings are checked where they are logged in-process."""
    folder, url, server = served
    reference, _ = global_batches(folder, 12, dp=1, mb=4, gbs=4, seed=1)
    loader = TrainLoader(url, global_batch_size=4, micro_batch_size=4, num_workers=workers, seed=1, prefetch=2,
                         read_policy=FAST)
    iterator = iter(loader)
    first = [next(iterator) for _ in range(3)]
    state = loader.state_dict()  # what a checkpoint after step 3 holds
    server.stop()
    with caplog.at_level(logging.WARNING, logger="tokenizer.storage"):
        with pytest.raises(StorageError) as raised:
            for _ in range(20):  # the items fetched before the stop come first
                next(iterator)
    message = str(raised.value)
    assert url in message and "after 3 attempts" in message and "data.read_retries" in message
    if workers == 0:  # a worker process logs to its own stderr, out of caplog's reach
        assert "retry 1 of 2" in caplog.text and "retry 2 of 2" in caplog.text
    assert [decode(item["tokens"]) for item in first] == [ids for _, ids in reference[:3]]
    server.start()  # back on the same port: the run resumes from its checkpoint
    resumed = TrainLoader(url, global_batch_size=4, micro_batch_size=4, num_workers=1, seed=1, read_policy=FAST)
    resumed.load_state_dict(state)
    steps = take(resumed, 9)
    assert [(item["position"].tolist(), decode(item["tokens"])) for [item] in steps] == reference[3:]


def test_corrupted_member_over_http_is_counted_like_a_local_one(served) -> None:
    folder, url, _ = served
    flip_block_header_byte(folder, shard=1, block=1, block_samples=4)  # ids 11..14

    def epoch(where: str | Path, **kwargs) -> tuple[list, int]:
        loader = TrainLoader(where, global_batch_size=5, micro_batch_size=5, num_workers=2, shuffle=False, **kwargs)
        iterator = iter(loader)
        items = [next(iterator) for _ in range(9)]
        return [(item["valid"].tolist(), item["tokens"].tolist()) for item in items], loader.corrupt_samples

    for kwargs in ({"verify_digests": False, "max_corrupt_fraction": 0.5}, {"max_corrupt_fraction": 0.25}):
        local, local_corrupt = epoch(folder, **kwargs)
        remote, remote_corrupt = epoch(url, **kwargs)
        assert remote == local and remote_corrupt == local_corrupt > 0
    valid = [v for item_valid, _ in remote for v in item_valid]
    assert valid == [not 7 <= i < 20 for i in range(45)]  # the digest distrusts the whole shard
    # A shard missing from the server is found when first touched, and counted like a local one.
    (folder / "train/shard-000002.tar").unlink()
    local, local_corrupt = epoch(folder, max_corrupt_fraction=0.5)
    remote, remote_corrupt = epoch(url, max_corrupt_fraction=0.5)
    assert remote == local and remote_corrupt == local_corrupt == 13 + 5


@pytest.mark.distributed
def test_torchrun_two_ranks_two_workers_read_the_url_like_the_folder(served, tmp_path: Path) -> None:
    from tests.helpers import torchrun

    folder, url, _ = served
    torchrun(2, "tests/dist/loader_worker.py", url, str(tmp_path / "out"), timeout=180)
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    config = ranks[0]["config"]
    local, _ = global_batches(folder, config["steps"], dp=2, mb=2, gbs=config["gbs"], seed=config["seed"])
    for step, (positions, ids) in enumerate(local):
        assert [p for r in ranks for p in r["positions"][step]] == positions
        assert [i for r in ranks for i in r["ids"][step]] == ids


# ---------------------------------------------------------------------------------------------
# S3 (moto's server): `tokenizer shard --out s3://...`, `tokenizer upload`, read back by URL


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    server = MotoS3()
    try:
        server.start()
    except RuntimeError as err:
        pytest.skip(f"no S3 server on loopback: {err}")
    try:
        for name, value in server.environment().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("PROSECO_CACHE", str(tmp_path / "cache"))
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("shards")
        yield server
    finally:
        server.stop()


def test_shard_to_s3_and_upload_read_back_by_url(s3, tmp_path: Path) -> None:
    from pretrain.cli import main
    from tests.helpers import make_word_shards
    from tokenizer.shard import verify_shards

    local = make_word_shards(tmp_path / "words")
    tokenizer = tmp_path / "words" / "tok"
    arguments = ["tokenizer", "shard", "--corpus", str(tmp_path / "words" / "docs"), "--tokenizer", str(tokenizer),
                 "--seq-len", "32", "--packing", "pack", "--samples-per-shard", "40", "--val-fraction", "0.1",
                 "--workers", "1"]
    assert main([*arguments, "--out", "s3://shards/words"]) == 0
    assert main([*arguments, "--out", "s3://shards/words"]) == 2  # exists: --overwrite replaces it
    url = "s3://shards/words"
    assert read_manifest(url) == read_manifest(local)
    assert verify_shards(url) == []
    manifest, tok = open_shards(url)  # the tokenizer copy comes down into PROSECO_CACHE
    assert tok.sha256 == manifest.tokenizer_sha256 and Path(tok.folder).is_relative_to(tmp_path / "cache")
    assert main(["tokenizer", "upload", str(local), "s3://shards/uploaded"]) == 0
    local_tokens = [item["tokens"] for step in take(TrainLoader(local, global_batch_size=8, micro_batch_size=4,
                                                                 num_workers=0), 12) for item in step]
    for where in (url, "s3://shards/uploaded"):
        remote = TrainLoader(where, global_batch_size=8, micro_batch_size=4, num_workers=2)
        remote_tokens = [item["tokens"] for step in take(remote, 12) for item in step]
        assert len(remote_tokens) == len(local_tokens) == 24
        assert all(torch.equal(a, b) for a, b in zip(local_tokens, remote_tokens))


def test_missing_protocol_package_and_missing_folder_name_the_fix(tmp_path: Path) -> None:
    from tokenizer.format import ShardError

    with pytest.raises(StorageError, match=r"gs://bucket/x needs the fsspec package for gs://.*\.\[gcs\]"):
        TrainLoader("gs://bucket/x", global_batch_size=2, micro_batch_size=2)  # gcsfs is not installed here
    with pytest.raises(StorageError, match=r"nosuch://b/x.*unknown"):
        TrainLoader("nosuch://b/x", global_batch_size=2, micro_batch_size=2)
    with pytest.raises(ShardError, match="does not exist"):
        TrainLoader(os.fspath(tmp_path / "absent"), global_batch_size=2, micro_batch_size=2)


def test_training_from_a_url_resumes_after_the_server_was_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train` on http://...: the same losses as from the local folder, a clear error while the
    server is down, and an exact resume from the checkpoint once it is back."""
    from pretrain.errors import UserError
    from pretrain.train import train
    from tests.helpers import make_word_shards
    from tests.test_train import tiny_config, train_losses

    monkeypatch.setenv("PROSECO_CACHE", str(tmp_path / "cache"))
    local = make_word_shards(tmp_path / "www")
    server = started_nginx(tmp_path)
    try:
        url = f"{server.url}/shards"
        train(tiny_config(local, tmp_path / "local"))
        workers = "data.num_workers=2"  # a user's default: reads happen in DataLoader workers
        train(tiny_config(url, tmp_path / "remote", "train.max_steps=3", workers))
        server.stop()
        with pytest.raises(UserError, match=f"{url}/manifest.json: could not read .* after 2 attempts"):
            train(tiny_config(url, tmp_path / "remote", "data.read_retries=1", "data.read_backoff_s=0.05", workers))
        server.start()
        train(tiny_config(url, tmp_path / "remote", workers))
    finally:
        server.stop()
    assert train_losses(tmp_path / "remote") == train_losses(tmp_path / "local")
    assert sorted(train_losses(tmp_path / "local")) == list(range(1, 7))


def test_a_size_request_to_a_server_that_is_down_is_retried_not_taken_for_a_missing_file(served) -> None:
    """fsspec's HTTP client turns a refused connection into FileNotFoundError when asked for a
    size: that must be retried and end in StorageError, never read as a missing (damaged) shard."""
    from tokenizer.storage import Store

    _, url, server = served
    store = Store(url, FAST)
    assert store.size("manifest.json") > 0
    with pytest.raises(FileNotFoundError):
        store.size("train/no-such-shard.tar")  # a real 404: missing at once, no retries
    server.stop()
    with pytest.raises(StorageError, match="after 3 attempts"):
        store.size("train/shard-000002.tar")
    server.start()
