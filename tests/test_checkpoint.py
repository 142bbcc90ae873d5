"""Checkpoints attacked: crafted pickles, truncated, emptied, deleted and bit-flipped files, a lost
write, a crash mid re-save, checkpoints from before digests. Real tiny training runs (checkpoints at
steps 3 and 6), then their files altered."""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pretrain.checkpoint import Checkpointer, list_checkpoints, load_model, step_folders
from pretrain.cli import main as cli_main
from pretrain.errors import CheckpointError
from pretrain.train import train
from tests.helpers import make_word_shards, torchrun
from tests.test_train import tiny_config

SHARD = "__0_0.distcp"
SYSTEM = re.escape(f"{os.system.__module__}.system")  # how pickle names os.system: posix.system on Linux


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_word_shards(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(shards, run))  # 6 steps, checkpoints at 3 and 6
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run, free to damage."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def newest(run: Path) -> Path:
    return run / "checkpoints" / "step_00000006"


def damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "delete":
        file.unlink()
    else:  # one bit flipped in the middle
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        file.write_bytes(bytes(flipped))


def rehash(checkpoint: Path) -> None:
    """What an attacker who rewrites files also does: a manifest that matches the new files."""
    files = {p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size,
                                                     "digest": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (checkpoint / "manifest.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))


class Touch:
    """Unpickles to a call of os.system that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("proseco: error:") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("how", ["truncate", "empty", "delete", "flip"])
@pytest.mark.parametrize("name", [SHARD, ".metadata", "meta.json"])
def test_a_damaged_checkpoint_is_skipped_on_resume_and_refused_by_the_tools(shards, run, name, how, capsys):
    damage(newest(run) / name, how)
    capsys.readouterr()
    for command in (["sample", "--checkpoint", str(newest(run)), "--out", str(run / "samples.jsonl")],
                    ["eval", "--checkpoint", str(newest(run))],
                    ["checkpoint", "consolidate", str(newest(run)), str(run / "full.safetensors")]):
        assert cli_main(command) == 2, command
        err = one_line_error(capsys)
        assert "step_00000006 cannot be loaded" in err and name in err and "step_00000003" in err, err
    assert train(tiny_config(shards, run, "train.max_steps=4"))["step"] == 4
    out = capsys.readouterr().out
    assert f"skipping damaged checkpoint {newest(run)}: {name}" in out, out
    assert f"resumed from {run / 'checkpoints' / 'step_00000003'} at step 3" in out, out
    assert "(moved to step_00000006.damaged)" in out and not newest(run).exists()  # out of the next resume's way


def test_the_latest_of_a_run_folder_is_checked_too(run, capsys):
    damage(newest(run) / SHARD, "flip")
    assert cli_main(["sample", "--checkpoint", str(run), "--out", str(run / "samples.jsonl")]) == 2
    assert f"{SHARD} does not match its sha256 digest" in one_line_error(capsys)


def test_code_in_the_dcp_metadata_never_runs(shards, run, tmp_path, capsys):
    """A crafted `.metadata` (with a manifest to match) is refused by load_model, `proseco sample`
    and resume, naming the file and the global; its code never runs."""
    marker = tmp_path / "MARKER"
    (newest(run) / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    rehash(newest(run))
    refused = rf"refused to unpickle the global {SYSTEM} in .*step_00000006/\.metadata"
    with pytest.raises(CheckpointError, match=refused):
        load_model(newest(run))
    assert cli_main(["sample", "--checkpoint", str(run), "--out", str(run / "samples.jsonl")]) == 2
    assert re.search(SYSTEM, one_line_error(capsys))
    with pytest.raises(CheckpointError, match=SYSTEM):
        train(tiny_config(shards, run, f"checkpoint.resume={newest(run)}"))
    assert train(tiny_config(shards, run, "train.max_steps=4"))["step"] == 4
    assert re.search(rf"skipping damaged checkpoint .*step_00000006: refused .*{SYSTEM}", capsys.readouterr().out)
    assert not marker.exists()


def test_code_in_a_saved_value_never_runs(shards, run, tmp_path):
    """DCP unpickles non-tensor values (optimizer hyper-parameters) with weights_only=False; a
    crafted one pointed to from `.metadata` is refused on resume."""
    marker, checkpoint = tmp_path / "MARKER", newest(run)
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())  # trusted here: this test's own run
    payload = io.BytesIO()
    torch.save(Touch(marker), payload)
    (checkpoint / "value.distcp").write_bytes(payload.getvalue())
    key = next(k for k in metadata.storage_data if k.fqn.endswith(".lr"))
    metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], relative_path="value.distcp",
                                                     offset=0, length=len(payload.getvalue()))
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    rehash(checkpoint)
    with pytest.raises(CheckpointError, match=rf"refused to unpickle the value of {key.fqn} \(the global {SYSTEM}\)"):
        train(tiny_config(shards, run, f"checkpoint.resume={checkpoint}", "train.max_steps=7"))
    assert not marker.exists()


def test_a_damaged_checkpoint_named_for_resume_fails_without_fallback(shards, run):
    damage(newest(run) / SHARD, "flip")
    with pytest.raises(CheckpointError, match=rf"step_00000006 cannot be loaded: {SHARD} does not match its sha256 "
                                              r"digest .*e\.g\. .*step_00000003"):
        train(tiny_config(shards, run, f"checkpoint.resume={newest(run)}", "train.max_steps=7"))


def test_resume_with_every_checkpoint_damaged_refuses_to_start_over(shards, run):
    for path in step_folders(run / "checkpoints"):
        damage(path / SHARD, "truncate")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* passes its checks \(step_00000006: .*; "
                                              r"step_00000003: .*\)"):
        train(tiny_config(shards, run, "train.max_steps=7"))


def test_verify_size_skips_digests_but_still_catches_truncation(shards, run, capsys):
    damage(newest(run) / SHARD, "flip")  # unnoticed without digests: the documented trade-off
    assert train(tiny_config(shards, run, "checkpoint.verify=size", "train.max_steps=7"))["step"] == 7
    assert "resumed from" in capsys.readouterr().out
    damage(run / "checkpoints" / "step_00000007" / SHARD, "truncate")
    assert train(tiny_config(shards, run, "checkpoint.verify=size", "train.max_steps=8"))["step"] == 8
    assert "skipping damaged checkpoint" in capsys.readouterr().out


def test_rotation_never_deletes_the_last_good_checkpoint(shards, tmp_path, monkeypatch, caplog):
    """keep_last=1 and a save whose shard the disk lost half of: the older checkpoint stays, the
    next resume skips the bad one, and a good save then rotates both out."""
    run = tmp_path / "run"
    train(tiny_config(shards, run, "checkpoint.keep_last=1", "train.max_steps=3"))
    real_save = dcp.save

    def lossy_save(state, *, checkpoint_id, **kwargs):
        written = real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        damage(Path(checkpoint_id) / SHARD, "truncate")
        return written

    monkeypatch.setattr(dcp, "save", lossy_save)
    train(tiny_config(shards, run, "checkpoint.keep_last=1", "train.max_steps=4"))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000003", "step_00000004"]
    assert "step_00000004 is damaged right after saving" in caplog.text
    monkeypatch.undo()
    train(tiny_config(shards, run, "checkpoint.keep_last=1", "train.max_steps=5"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004.damaged", "step_00000005"]


def saved_weight(path: Path) -> float:
    state = {"w": torch.zeros(2)}
    Checkpointer.load(path, state)
    return state["w"][0].item()


def test_resaving_a_step_replaces_it_and_a_crash_midway_keeps_the_old_one(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(3, {"w": torch.full((2,), 1.0)}, {})
    checkpointer.save(3, {"w": torch.full((2,), 2.0)}, {})
    assert saved_weight(tmp_path / "step_00000003") == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]
    real_replace = os.replace

    def killed_before_the_rename(source, target):
        if str(source).endswith(".tmp"):
            raise OSError("killed")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_before_the_rename)
    with pytest.raises(OSError, match="killed"):
        checkpointer.save(3, {"w": torch.full((2,), 3.0)}, {})
    monkeypatch.undo()
    Checkpointer(tmp_path).remove_incomplete()  # the next start
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]
    assert saved_weight(tmp_path / "step_00000003") == 2.0


def make_old_format(checkpoint: Path) -> None:
    """A checkpoint as saved before digests: no manifest.json, meta.json without its name."""
    (checkpoint / "manifest.json").unlink()
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["manifest"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_checkpoints_from_before_digests_load_with_one_warning_and_sizes_checked(shards, run, caplog, capsys):
    for path in step_folders(run / "checkpoints"):
        make_old_format(path)
    load_model(newest(run))
    load_model(newest(run))
    assert sum("has no digests" in r.getMessage() for r in caplog.records) == 1
    damage(newest(run) / SHARD, "truncate")  # caught by the extents `.metadata` records
    with pytest.raises(CheckpointError, match=rf"{SHARD} has \d[\d,]* bytes but \.metadata reads up to byte"):
        load_model(newest(run))
    assert train(tiny_config(shards, run, "train.max_steps=4"))["step"] == 4
    out = capsys.readouterr().out
    assert f"skipping damaged checkpoint {newest(run)}: {SHARD} has" in out and "step_00000003 at step 3" in out, out


@pytest.mark.distributed
def test_two_ranks_split_the_digests_and_agree_on_the_fallback(shards, tmp_path):
    """dp=2: each rank hashes its own shard at save time; at resume each checks half the files,
    and a flip only rank 1 sees still makes both ranks fall back to the same checkpoint."""
    run = tmp_path / "run"
    args = [f"data.shards={shards}", f"logging.run_dir={run}", "parallel.dp=2", "train.eval_every=0",
            "checkpoint.every=3", "logging.log_every=1", "logging.progress=false", "data.num_workers=1"]
    torchrun(2, "tests/dist/parallel_worker.py", "train", *args, "train.max_steps=6")
    files = json.loads((newest(run) / "manifest.json").read_text())["files"]
    assert {SHARD, "__1_0.distcp", ".metadata", "meta.json"} <= set(files)
    damage(newest(run) / SHARD, "flip")  # sorted files, split by rank: rank 1 checks __0_0.distcp
    result = torchrun(2, "tests/dist/parallel_worker.py", "train", *args, "train.max_steps=7")
    assert f"skipping damaged checkpoint {newest(run)}: {SHARD} does not match" in result.stdout, result.stdout
    assert "step_00000003 at step 3" in result.stdout
