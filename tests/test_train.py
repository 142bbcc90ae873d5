"""The single-process training loop end to end on real shards: exact resume, NaN guard,
checkpoints, bad input, sampling from a checkpoint."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import pretrain.train as train_module
from pretrain.checkpoint import Checkpointer, latest_checkpoint, list_checkpoints, load_model
from pretrain.cli import main as cli_main
from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.metrics import read_metrics
from pretrain.report import write_sample_report
from pretrain.train import NonFiniteError, train
from tests.helpers import make_word_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_word_shards(tmp_path_factory.mktemp("corpus"))


def tiny_args(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        f"data.shards={shards}", f"logging.run_dir={run_dir}", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=2", "model.cond_dim=16", "data.global_batch_size=8", "data.micro_batch_size=4",
        "data.num_workers=0", "optim.warmup_steps=2", "optim.lr=3e-3", "train.eval_every=3", "train.eval_batches=2",
        "checkpoint.every=3", "logging.log_every=1", "logging.progress=false", "model.dropout=0.1",
        "sampling.num_samples=2", "sampling.batch_size=2", "sampling.steps=4",
        "train.max_steps=6", *overrides]


def tiny_config(shards: Path, run_dir: Path, *overrides: str):
    return load_config(None, tiny_args(shards, run_dir, *overrides))


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(shards, tmp_path):
    """N steps == k steps + resume + N-k steps, loss for loss (dropout on, accumulation of 2)."""
    straight = train(tiny_config(shards, tmp_path / "a"))
    train(tiny_config(shards, tmp_path / "b", "train.max_steps=3"))
    resumed = train(tiny_config(shards, tmp_path / "b"))
    write_sample_report(tmp_path / "b", torch.device("cpu"))  # what `proseco train` does after train()
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    straight.pop("seconds"), resumed.pop("seconds")
    assert straight == resumed  # final validation metrics, bit for bit
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_00000003", "step_00000006"]
    assert (tmp_path / "b" / "loss.png").stat().st_size > 0
    assert (tmp_path / "b" / "config.yaml").is_file()
    assert "MDLM at equal NFE" in (tmp_path / "b" / "samples.md").read_text()


def test_two_pass_mode_trains_like_reuse_without_dropout(shards, tmp_path):
    a = train(tiny_config(shards, tmp_path / "reuse", "model.dropout=0.0", "train.max_steps=3"))
    b = train(tiny_config(shards, tmp_path / "two", "model.dropout=0.0", "train.max_steps=3",
                          "train.step_mode=two_pass"))
    la, lb = train_losses(tmp_path / "reuse"), train_losses(tmp_path / "two")
    assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-4 * abs(la[k]) for k in la)
    assert a["mdlm_nelbo"] == pytest.approx(b["mdlm_nelbo"], rel=1e-4)


def test_adamw_implementations_agree_and_a_resume_takes_the_run_config(shards, tmp_path, monkeypatch):
    """Fused and for-loop AdamW train alike (to fp32 rounding); a run resumed with other optim
    settings steps with them, not with the param groups its checkpoint carries."""
    train(tiny_config(shards, tmp_path / "fused", "model.dropout=0.0"))
    train(tiny_config(shards, tmp_path / "mixed", "model.dropout=0.0", "optim.implementation=for-loop",
                      "train.max_steps=3"))
    groups = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        groups.append({key: self.param_groups[0][key] for key in ("fused", "foreach", "betas", "eps")})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train(tiny_config(shards, tmp_path / "mixed", "model.dropout=0.0", "optim.eps=1e-7"))
    # Steps 4-6, after the one (at lr 0) that loading the optimizer state runs to create it.
    assert groups == [{"fused": True, "foreach": None, "betas": (0.9, 0.999), "eps": 1e-7}] * 4
    fused, mixed = train_losses(tmp_path / "fused"), train_losses(tmp_path / "mixed")
    assert fused.keys() == mixed.keys() == set(range(1, 7))
    assert all(abs(fused[k] - mixed[k]) <= 1e-5 * fused[k] for k in fused), (fused, mixed)


def test_nonfinite_loss_stops_before_the_update_and_keeps_the_checkpoint(shards, tmp_path, monkeypatch):
    real = train_module.forward_backward

    def poisoned(runner, batches, objective, step, *args, **kwargs):
        metrics = real(runner, batches, objective, step, *args, **kwargs)
        if step == 4:  # the fifth optimizer step: a NaN loss whose gradients are NaN too
            for part in runner.parts:
                for p in part.parameters():
                    p.grad.mul_(float("nan"))
            metrics.loss = metrics.loss * float("nan")
        return metrics

    monkeypatch.setattr(train_module, "forward_backward", poisoned)
    with pytest.raises(NonFiniteError, match="non-finite loss at step 4"):
        train(tiny_config(shards, tmp_path / "run"))
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000003"
    monkeypatch.setattr(train_module, "forward_backward", poisoned)
    result = train(tiny_config(shards, tmp_path / "skip", "train.on_nonfinite=skip"))
    assert result["step"] == 6 and all(v == v for v in train_losses(tmp_path / "skip").values() if v is not None)


def test_preemption_saves_and_resumes(shards, tmp_path, monkeypatch):
    calls = {"n": 0}

    def signalled(self):
        calls["n"] += 1
        return calls["n"] == 2

    monkeypatch.setattr(train_module.PreemptionFlag, "agreed", signalled)
    result = train(tiny_config(shards, tmp_path / "run", "checkpoint.every=0"))
    assert result == {"preempted": True, "step": 2}
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000002"
    monkeypatch.undo()
    assert train(tiny_config(shards, tmp_path / "run", "checkpoint.every=0"))["step"] == 6


def test_keep_every_checkpoints_outlive_keep_last(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_last=2, keep_every=3)
    for step in range(1, 8):
        checkpointer.save(step, {"w": torch.full((2,), float(step))}, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006", "step_00000007"]
    state = {"w": torch.zeros(2)}
    assert Checkpointer.load(tmp_path / "step_00000003", state)["step"] == 3
    assert state["w"].tolist() == [3.0, 3.0]


def test_incomplete_checkpoints_are_never_latest(shards, tmp_path):
    train(tiny_config(shards, tmp_path / "run", "train.max_steps=3"))
    folder = tmp_path / "run" / "checkpoints"
    shutil.copytree(folder / "step_00000003", folder / "step_00000009.tmp")
    broken = folder / "step_00000008"
    shutil.copytree(folder / "step_00000003", broken)
    (broken / "meta.json").unlink()  # a save killed before it finished
    assert latest_checkpoint(folder).name == "step_00000003"
    train(tiny_config(shards, tmp_path / "run", "train.max_steps=4"))  # resumes from 3, cleans the .tmp
    assert not (folder / "step_00000009.tmp").exists()
    assert latest_checkpoint(folder).name == "step_00000004"


@pytest.mark.parametrize("overrides, needle", [
    (["model.seq_len=64"], "model.seq_len=64 but the shards hold sequences of 32"),
    (["model.vocab_size=3"], "smaller than the tokenizer"),
    (["data.shards=/nonexistent/shards"], "does not exist"),
])
def test_bad_input_is_reported_before_training(shards, tmp_path, overrides, needle):
    with pytest.raises(UserError, match=needle):
        train(tiny_config(shards, tmp_path / "run", *overrides))


def test_resume_none_refuses_to_overwrite(shards, tmp_path):
    train(tiny_config(shards, tmp_path / "run", "train.max_steps=3"))
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(tiny_config(shards, tmp_path / "run", "checkpoint.resume=none"))


def test_sample_command_from_checkpoint(shards, tmp_path):
    train(tiny_config(shards, tmp_path / "run", "train.max_steps=3"))
    out = tmp_path / "samples.jsonl"
    code = cli_main(["sample", "--checkpoint", str(tmp_path / "run"), "--num-samples", "3", "--steps", "8",
                     "--corrector-steps", "2", "--out", str(out), "--denoise-final", "--prompt", "the king"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["text"].startswith("the king") for r in rows)  # the prompt stays the prefix
    assert len(rows) == 3 and all(r["nfe_total"] == r["nfe_denoiser"] + r["nfe_corrector"] for r in rows)
    assert all(r["nfe_corrector"] >= 8 for r in rows)  # a loop after each of the 8 steps
    model, cfg, tokenizer = load_model(tmp_path / "run")
    assert cfg.model.seq_len == 32 and isinstance(model(torch.zeros(1, 32, dtype=torch.long)), torch.Tensor)
    assert cli_main(["sample", "--checkpoint", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_sigterm_to_the_whole_job_saves_and_exits_cleanly(shards, tmp_path):
    """Slurm preemption signals every process of the step, DataLoader workers included: the run
    must still save a checkpoint and exit with 75 (resume me), and resume from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_args(shards, run_dir) if not o.startswith("data.num_workers")]
    command = [sys.executable, "-m", "pretrain.cli", "train", *overrides, "data.num_workers=1",
               "train.max_steps=100000", "checkpoint.every=0", "train.eval_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-3000:]  # checkpointed: run again to resume
    saved = latest_checkpoint(run_dir / "checkpoints")
    assert saved is not None and "preemption signal" in out + err
    step = int(saved.name.split("_")[1])
    result = train(tiny_config(shards, run_dir, f"train.max_steps={step + 2}"))
    assert result["step"] == step + 2


def test_bf16_autocast_and_offline_wandb(shards, tmp_path, monkeypatch):
    """bf16 autocast trains (weights and LayerNorm stay fp32); wandb offline needs no network."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(tiny_config(shards, tmp_path / "run", "train.precision=bf16", "train.max_steps=2",
                               "logging.wandb=offline", "train.eval_every=0"))
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 2 and all(v == v and abs(v) < 1e3 for v in losses.values())
    assert result["mdlm_nelbo"] == result["mdlm_nelbo"]
    assert any((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_train_command_resumes_past_a_damaged_checkpoint(shards, tmp_path):
    """`proseco train` with DataLoader workers on: a bit-flipped newest checkpoint is skipped (and
    said so), the run resumes from the one before, and the end-of-run report samples from a good one."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    train(tiny_config(shards, run_dir))  # checkpoints at 3 and 6
    shard = run_dir / "checkpoints" / "step_00000006" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    overrides = [o for o in tiny_args(shards, run_dir) if not o.startswith("data.num_workers")]
    command = [sys.executable, "-m", "pretrain.cli", "train", *overrides, "data.num_workers=1", "train.max_steps=5"]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping damaged checkpoint {shard.parent}: __0_0.distcp does not match" in proc.stdout, proc.stdout
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000003'} at step 3" in proc.stdout
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000005"
    assert "MDLM at equal NFE" in (run_dir / "samples.md").read_text()
