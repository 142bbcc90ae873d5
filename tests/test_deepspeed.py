"""The DeepSpeed engine (parallel.engine=deepspeed) against the native one, its checkpoints across
engines, and the DeepSpeed launcher.

Multi-process checks run under torchrun (or the `deepspeed` launcher) on CPU with gloo; DeepSpeed
compiles its shared-memory op once per machine into tests/helpers.TORCH_EXTENSIONS. Tiny fp32
models; runs that compare losses use a small learning rate (Adam turns ~1e-8 gradient differences
into lr-sized update differences, environment.md), the parity run a larger one over few steps.
"""

import json
import math
import shutil
import socket
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import consolidate, latest_checkpoint, load_model
from pretrain.checkpoint.deepspeed import to_dcp
from pretrain.checkpoint.folder import is_deepspeed_checkpoint
from pretrain.config import load_config
from pretrain.convert.hf_export import export_checkpoint
from pretrain.errors import CheckpointError
from pretrain.metrics import read_metrics
from pretrain.train import train
from tests.dist.parallel_worker import TINY
from tests.helpers import ROOT, launch_env, make_word_shards, torchrun

NO_DEEPSPEED = find_spec("deepspeed") is None
pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(NO_DEEPSPEED, reason="deepspeed is not installed (extra: deepspeed)")]
WORKER = "tests/dist/deepspeed_worker.py"
ZERO = {stage: f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json" for stage in (1, 2, 3)}
DEEPSPEED = "parallel.engine=deepspeed"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_word_shards(tmp_path_factory.mktemp("corpus"), seq_len=16)


def run_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"logging.run_dir={run_dir}", "optim.lr=1e-5", "train.eval_every=0",
            "train.eval_batches=2", "checkpoint.every=2", "logging.log_every=1", "sampling.num_samples=2",
            "sampling.batch_size=2", "sampling.steps=2", "train.max_steps=4", "parallel.timeout_s=60", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def last_val(run_dir: Path) -> dict:
    return [r for r in read_metrics(run_dir) if r["split"] == "val"][-1]


def assert_same_losses(got: dict[int, float], expected: dict[int, float], steps: set[int], tol: float) -> None:
    assert got.keys() == steps, (got, expected)
    for step in steps:
        assert abs(got[step] - expected[step]) <= tol * abs(expected[step]), (step, got, expected)


def test_zero_1_2_3_match_native_dp2_step_for_step_in_both_step_modes(shards, tmp_path):
    """Three AdamW steps with clipping active (norm > optim.grad_clip), lr 1e-3: the loss terms and
    the gradient norm of every step agree with FSDP2 at dp=2 to ~1e-7, in reuse and two_pass, for
    ZeRO-1, 2, 3 and 2 with the optimizer state offloaded; ZeRO-3 in bf16 with offload to ~1e-2."""
    torchrun(2, WORKER, "parity", str(shards), str(tmp_path / "parity.json"))
    results = json.loads((tmp_path / "parity.json").read_text())
    engines = ("native", "zero1", "zero2", "zero3", "zero2-offload", "zero3-bf16-offload")
    assert sorted(results) == sorted(f"{mode}/{engine}" for mode in ("reuse", "two_pass") for engine in engines)
    for mode in ("reuse", "two_pass"):
        native = results[f"{mode}/native"]["records"]
        assert native[0]["grad_norm"] > 0.5  # clipping acts on every step compared
        assert native[0]["loss"] != native[-1]["loss"]  # the weights moved
        for engine in engines[1:]:
            got = results[f"{mode}/{engine}"]
            # bf16 weights and activations: the same training, not the same digits.
            tol = 3e-2 if "bf16" in engine else 1e-6
            for step, (mine, theirs) in enumerate(zip(got["records"], native)):
                for key, value in theirs.items():
                    assert abs(mine[key] - value) <= tol * abs(value), (mode, engine, step, key, mine, theirs)
            assert got["ema_matches_weights"] is (True if engine.startswith("zero3") else None)


def test_killed_deepspeed_run_resumes_and_moves_between_engines(shards, tmp_path, monkeypatch):
    """A ZeRO-2 run killed (rank 1 dies) after its step-2 checkpoint resumes under DeepSpeed like the
    run that never stopped; in the same launch ZeRO-3 resumes the native engine's DCP checkpoint; the
    killed run's DeepSpeed checkpoint, converted to DCP, resumes natively at dp=1; consolidation
    and the Hugging Face export read DeepSpeed checkpoints directly."""
    reference = tmp_path / "reference"
    train(load_config(None, [*TINY, *run_overrides(shards, reference)]))
    expected = losses(reference)

    killed = tmp_path / "killed"
    monkeypatch.setenv("PROSECO_TEST_DIE", "rank=1,step=3")  # after step 3, saved at step 2
    with pytest.raises(AssertionError, match="failed"):
        torchrun(2, "tests/dist/parallel_worker.py", "train", *run_overrides(shards, killed, DEEPSPEED, ZERO[2]))
    monkeypatch.delenv("PROSECO_TEST_DIE")
    assert sorted(losses(killed)) == [1, 2, 3]
    assert [p.name for p in sorted((killed / "checkpoints").iterdir())] == ["step_00000002"]
    checkpoint = killed / "checkpoints" / "step_00000002"
    assert is_deepspeed_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="saved by the DeepSpeed engine: resume it with parallel.engine"):
        train(load_config(None, [*TINY, *run_overrides(shards, killed)]))  # the native engine says what to do
    native = tmp_path / "native-from-deepspeed"
    to_dcp(checkpoint, native)  # DeepSpeed -> universal -> DCP, before the resume below rotates it away

    from_native = tmp_path / "zero3-from-native"
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([
        run_overrides(shards, killed, DEEPSPEED, ZERO[2]),
        run_overrides(shards, from_native, DEEPSPEED, ZERO[3],
                      f"checkpoint.resume={reference / 'checkpoints' / 'step_00000002'}"),
    ]))
    torchrun(2, WORKER, "runs", str(spec))
    assert_same_losses(losses(killed), expected, {1, 2, 3, 4}, 1e-5)
    assert_same_losses(losses(from_native), expected, {3, 4}, 1e-5)
    # Validation with the EMA weights, on the same samples. ZeRO-2 resumes its own run bit for bit;
    # ZeRO-3 after the native engine agrees to 3e-5 (measured 1.1e-5 with the chunked loss, 2.5e-6
    # with whole logits): its reduction sums the head's per-chunk gradients in another order, and
    # Adam at lr 1e-5 turns such last-digit differences of near-zero gradients into lr-sized steps.
    for run, tol in ((killed, 1e-5), (from_native, 3e-5)):
        got, want = last_val(run), last_val(reference)
        assert got["tokens"] == want["tokens"] and abs(got["mdlm_nelbo"] - want["mdlm_nelbo"]) <= tol * want[
            "mdlm_nelbo"] and abs(got["corrector_nll"] - want["corrector_nll"]) <= tol * want["corrector_nll"], (
            run.name, got, want)

    train(load_config(None, [*TINY, *run_overrides(shards, native)]))  # one process: dp 2 -> 1
    assert_same_losses(losses(native), expected, {3, 4}, 1e-5)

    # A ZeRO-3 checkpoint (partitioned weights and EMA) read whole, three ways.
    zero3 = from_native / "checkpoints" / "step_00000004"
    assert is_deepspeed_checkpoint(zero3)
    tensors = load_file(consolidate(zero3, tmp_path / "zero3.safetensors"))
    model, _, _ = load_model(zero3, use_ema=False)
    ema_model, _, _ = load_model(zero3, use_ema=True)
    reference_full = load_file(consolidate(reference, tmp_path / "reference.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(tensors[name], p.detach())
        assert torch.equal(tensors[f"ema.{name}"], dict(ema_model.named_parameters())[name].detach())
        assert torch.allclose(tensors[name], reference_full[name], rtol=0, atol=1e-5), name
        assert torch.allclose(tensors[f"ema.{name}"], reference_full[f"ema.{name}"], rtol=0, atol=1e-5), name
    exported = export_checkpoint(zero3, tmp_path / "hf")
    assert exported.weights == "EMA" and (tmp_path / "hf" / "config.json").is_file()


def test_nonfinite_loss_or_gradient_never_reaches_the_weights_zero_1_2_3(shards, tmp_path):
    """fp32, ZeRO-1, 2, 3, one launch. With train.on_nonfinite=skip, a NaN loss whose gradients are
    finite (step 0, before any update; on rank 0) and an Inf gradient under a finite loss (step 2,
    on rank 1) change nothing: weights, DeepSpeed's fp32 master, AdamW's moments and step counts,
    the EMA and its count are bit for bit those before the step, and the steps after give the
    losses, bit for bit, and the end state of a run that never took those steps. With
    on_nonfinite=stop a NaN loss raises NonFiniteError with the state untouched, and a `proseco
    train` run so stopped keeps, in memory and in its last checkpoint, the weights before it."""
    torchrun(2, WORKER, "nonfinite", str(shards), str(tmp_path / "nonfinite.json"), str(tmp_path))
    results = json.loads((tmp_path / "nonfinite.json").read_text())
    for stage in ("zero1", "zero2", "zero3"):
        got = results[stage]
        nan_loss, inf_grad = got["skipping/0"], got["skipping/2"]
        assert nan_loss["loss"] != nan_loss["loss"] and math.isfinite(nan_loss["grad_norm"]), (stage, nan_loss)
        assert math.isfinite(inf_grad["loss"]) and not math.isfinite(inf_grad["grad_norm"]), (stage, inf_grad)
        for record in (nan_loss, inf_grad):
            assert record["changed"] == [] and record["skipped_steps"] == 1, (stage, record)
        for step in (1, 3):
            mine, reference = got[f"skipping/{step}"], got[f"reference/{step}"]
            assert mine["changed"] and mine["skipped_steps"] == 0, (stage, step, mine)
            assert (mine["loss"], mine["grad_norm"]) == (reference["loss"], reference["grad_norm"]), (
                stage, step, mine, reference)
        for step in range(4):  # DeepSpeed counts every step, withheld or not, as one (micro) step
            assert got[f"skipping/{step}"]["deepspeed"][:2] == [step + 1, step + 1], (stage, step, got)
        assert got["skipped_vs_reference"] == [], stage
        assert "non-finite loss at step 4" in got["stop"]["error"] and got["stop"]["changed"] == [], got["stop"]

    run = results["run"]
    assert "non-finite loss at step 2" in run["error"] and run["step"] == 2, run
    last = latest_checkpoint(tmp_path / "stopped" / "checkpoints")
    assert last.name == "step_00000002" and is_deepspeed_checkpoint(last)
    in_memory = load_file(tmp_path / "stopped" / "in_memory.safetensors")
    model, _, _ = load_model(last, use_ema=False)
    for name, p in model.named_parameters():
        assert torch.equal(in_memory[name], p.detach()), name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deepspeed_launcher_runs_the_cli_with_local_rank(shards, tmp_path):
    """`deepspeed --num_gpus 2 --module pretrain.cli train ...`: the launcher's --local_rank flag is
    accepted, ranks come from its variables, the run trains under ZeRO-1 and the end-of-run report
    samples from its DeepSpeed checkpoint."""
    run_dir = tmp_path / "run"
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    command = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain.cli", "train",
               *TINY, *run_overrides(shards, run_dir, DEEPSPEED, ZERO[1])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=launch_env(), cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "--local_rank=0" in output and "DeepSpeed ZeRO-1" in output and "dp=2" in output, output[-3000:]
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "samples.md").is_file(), sorted(p.name for p in run_dir.iterdir())
