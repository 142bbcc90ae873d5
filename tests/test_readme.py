"""The README's commands, run: every command of its ```bash blocks either runs here, in README
order, in a scratch folder (real Shakespeare, a tiny model), or is skipped for a reason listed in
SKIPPED, after a check that what it names still exists (Makefile targets and variables, extras,
files) and, for launches on many processes, that its layout passes validation. A command that no
longer works, or a new command no rule covers, fails."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import load_config, split_config_args, validate
from tests.helpers import ROOT

README = ROOT / "README.md"

# Appended to `proseco train ...` (later overrides win): the README's run, shrunk to seconds.
TINY_TRAIN = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.cond_dim=16",
              "data.global_batch_size=4", "data.micro_batch_size=2", "data.num_workers=0", "optim.warmup_steps=1",
              "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1", "checkpoint.every=2",
              "sampling.num_samples=2", "sampling.batch_size=2", "sampling.steps=2", "logging.progress=false"]


def readme_commands(text: str) -> list[list[str]]:
    """Every command of the ```bash blocks, as words: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def option(words: list[str], name: str, default: str | None = None) -> str | None:
    """The value of `--name V` or `--name=V` in a command line."""
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return default


def check_layout(config_and_overrides: list[str], world_size: int) -> None:
    """What a launch on `world_size` processes would validate first (`proseco config show --world-size`)."""
    config, overrides = split_config_args(config_and_overrides[0], config_and_overrides[1:])
    validate(load_config(str(ROOT / config) if config else None, overrides), world_size=world_size)


# -- the skipped commands, each with the check that still runs --------------------------------------


def check_make(words: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    for word in words[1:]:
        if "=" in word:
            variable = word.split("=", 1)[0]
            assert re.search(rf"^{variable} \?=", makefile, re.M), f"the Makefile has no variable {variable}"
        else:
            assert re.search(rf"^{re.escape(word)}:", makefile, re.M), f"the Makefile has no target {word}"


def pyproject_extras() -> set[str]:
    """The names under [project.optional-dependencies] (read as text: tomllib is Python 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = \[", section, re.M))


def check_pip(words: list[str]) -> None:
    extras = pyproject_extras()
    for i, word in enumerate(words):
        named = re.fullmatch(r"\.\[([\w,-]+)\]", word)
        if named:
            missing = set(named.group(1).split(",")) - extras
            assert not missing, f"pyproject.toml has no extras {sorted(missing)}"
        if word == "-r":
            assert (ROOT / words[i + 1]).is_file(), f"{words[i + 1]} is missing"


def check_torchrun(words: list[str]) -> None:
    module = words.index("-m")
    assert words[module + 1] == "pretrain.cli" and words[module + 2] == "train", words
    world = int(option(words, "--nproc_per_node")) * int(option(words, "--nnodes", "1"))
    check_layout(words[module + 3:], world)


def check_sbatch(words: list[str]) -> None:
    script = next(i for i, word in enumerate(words) if word.endswith(".sbatch"))
    assert (ROOT / words[script]).is_file(), f"{words[script]} is missing"
    check_layout(words[script + 1:], int(option(words, "--nodes")) * int(option(words, "--ntasks-per-node")))


SKIPPED = {
    # first word(s) of the command: (why it does not run here, what is checked instead)
    ("make",): ("runs the whole install, the 9-minute demo or the 10-minute suite (CI runs them); "
                "its targets and variables are checked", check_make),
    ("pip", "install"): ("installs packages (a CUDA torch, flash-attn against a CUDA toolkit, the project "
                         "itself); the extras and files it names are checked", check_pip),
    ("python3", "-m", "venv"): ("creates an environment", lambda words: None),
    (".",): ("activates an environment", lambda words: None),
    ("torchrun",): ("launches 8 processes (GPUs); its layout is validated at that world size", check_torchrun),
    ("sbatch",): ("needs a Slurm cluster of 32 GPUs; its layout is validated at that world size", check_sbatch),
}


def skip_rule(words: list[str]):
    for prefix, rule in SKIPPED.items():
        if tuple(words[: len(prefix)]) == prefix:
            return rule
    return None


def proseco() -> list[str]:
    """The installed console script, as a user runs it (`python -m pretrain` without one)."""
    script = Path(sys.executable).with_name("proseco")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pretrain"]


COMMANDS = readme_commands(README.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, subprocess.CompletedProcess]:
    """Every runnable README command, in README order, in one scratch folder (configs/ linked in,
    data/ and runs/ made there by the commands themselves)."""
    workdir = tmp_path_factory.mktemp("readme")
    (workdir / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    done = {}
    for index, words in enumerate(COMMANDS):
        if words[0] != "proseco" or skip_rule(words):
            continue
        args = words[1:] + (TINY_TRAIN if words[1] == "train" else [])
        done[index] = subprocess.run([*proseco(), *args], cwd=workdir, env=env, capture_output=True, text=True,
                                     timeout=180)
    return done


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 10 and any(words[0] == "proseco" for words in COMMANDS)


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[" ".join(words)[:90] for words in COMMANDS])
def test_readme_command(index, results):
    words = COMMANDS[index]
    rule = skip_rule(words)
    if rule is not None:
        reason, check = rule
        check(words)
        pytest.skip(reason)
    assert words[0] == "proseco", f"no rule runs or skips this README command; add one to {__name__}: {words}"
    result = results[index]
    assert result.returncode == 0 and "Traceback" not in result.stderr, (
        f"`{' '.join(words)}` failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
