"""parallel.compile: torch.compile per block gives eager's losses and gradients, keeps the
parameter names, composes with activation checkpointing, and does not recompile per batch size.

The fast tests trace with the aot_eager backend (dynamo + AOTAutograd: the same graphs, forward and
backward, as inductor, without generating C++), the inductor ones are the real backend: its
forward here, a whole training step in the slow test and in the CLI run."""

import copy
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from parallel.compile import apply_compile
from parallel.config import ParallelConfig
from parallel.data_parallel import apply_activation_checkpointing
from pretrain.checkpoint import load_model
from pretrain.cli import main as cli_main
from pretrain.models import ModelShape
from pretrain.models.dit.model import DiT
from tests.helpers import make_word_shards, torchrun
from tests.test_model import randomise
from tests.test_step import CFG, VOCAB, L, loss_and_grads, make_batch, objective
from tests.test_train import tiny_args, train_losses

TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # fp32: a fused kernel reorders sums
WORKER = "tests/dist/compile_worker.py"  # `proseco train` under torchrun, compiled with a chosen backend


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with no compiled graphs and zeroed counters."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def eager_and_compiled(backend: str, checkpointed: bool = False) -> tuple[DiT, DiT]:
    torch.manual_seed(0)
    eager = DiT(CFG, ModelShape(VOCAB, L))
    randomise(eager)
    compiled = copy.deepcopy(eager)
    if checkpointed:
        apply_activation_checkpointing(compiled.blocks.values())
    apply_compile(compiled.blocks.values(), backend=backend)
    return eager, compiled


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def assert_steps_match(eager: DiT, compiled: DiT, modes: tuple[str, ...]) -> None:
    obj = objective()
    for step, mode in enumerate(modes):
        batch = make_batch(seed=step)
        loss_eager, grads_eager = loss_and_grads(eager, batch, obj, mode)
        loss_compiled, grads_compiled = loss_and_grads(compiled, batch, obj, mode)
        assert torch.allclose(loss_compiled, loss_eager, **TOLERANCE), mode
        assert grads_compiled.keys() == grads_eager.keys()
        for name, grad in grads_eager.items():
            assert torch.allclose(grads_compiled[name], grad, **TOLERANCE), (mode, name)


def test_compiled_llada_blocks_give_eager_losses_and_gradients():
    """parallel.compile is the family's plan's, not the DiT's: LLaDA's blocks (RMSNorm, SwiGLU,
    rotary, grouped-query attention) compile to eager's losses and gradients in both step modes."""
    from pretrain.models.llada.model import LLaDA
    from tests.test_llada import tiny

    torch.manual_seed(0)
    eager = LLaDA(tiny(vocab_size=VOCAB, vocab_multiple=8, seq_len=L), ModelShape(VOCAB, L))
    randomise(eager)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled.blocks.values(), backend="aot_eager")
    assert_steps_match(eager, compiled, ("reuse", "two_pass"))
    assert graphs() > 0 and counters["graph_break"] == {}


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "activation_checkpointing"])
def test_compiled_blocks_give_eager_losses_and_gradients_in_both_step_modes(checkpointed):
    """reuse (B rows, grad), two_pass (B without grad, 2B with) and validation (no grad) settle on
    a few graphs: batch sizes met later compile nothing new."""
    eager, compiled = eager_and_compiled("aot_eager", checkpointed)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load across the switch
    assert_steps_match(eager, compiled, ("reuse", "two_pass"))
    with torch.no_grad():
        compiled(make_batch(batch_size=3)["tokens"])
    settled = graphs()
    assert 0 < settled <= 4  # > 0: the blocks really ran compiled, not eagerly after a failed trace
    assert counters["graph_break"] == {}
    for batch_size in (2, 5, 9):
        tokens = make_batch(batch_size=batch_size, seed=batch_size)["tokens"]
        with torch.no_grad():
            assert torch.allclose(compiled(tokens), eager(tokens), **TOLERANCE)
        compiled(tokens).sum().backward()
    assert graphs() == settled


def test_inductor_blocks_give_eager_logits():
    eager, compiled = eager_and_compiled("inductor")
    tokens = make_batch()["tokens"]
    with torch.no_grad():
        assert torch.allclose(compiled(tokens), eager(tokens), **TOLERANCE)
    assert graphs() > 0


@pytest.mark.slow
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "activation_checkpointing"])
def test_inductor_training_steps_give_eager_losses_and_gradients(checkpointed):
    eager, compiled = eager_and_compiled("inductor", checkpointed)
    assert_steps_match(eager, compiled, ("reuse", "two_pass", "reuse"))
    assert counters["graph_break"] == {}


def test_compile_rejects_tp_and_zero_3_and_needs_a_cxx_compiler(monkeypatch):
    assert ParallelConfig(compile=True).problems(world_size=1, num_layers=2) == []
    zero = "configs/deepspeed/zero{}.json".format
    assert ParallelConfig(compile=True, engine="deepspeed", deepspeed_config=zero(2)).problems(2, 2) == []
    problems = ParallelConfig(compile=True, engine="deepspeed", deepspeed_config=zero(3)).problems(2, 2)
    assert any("parallel.compile" in p and "ZeRO-3" in p for p in problems)
    problems = ParallelConfig(compile=True, tp=2).problems(world_size=2, num_layers=2)
    assert any("parallel.compile" in p and "parallel.tp=1" in p for p in problems)
    assert ParallelConfig(compile=True, pp=2, dp=2).problems(world_size=4, num_layers=2) == []
    monkeypatch.setattr("parallel.compile.shutil.which", lambda name: None)
    (problem,) = ParallelConfig(compile=True).problems(world_size=1, num_layers=2)
    assert "C++ compiler" in problem and "parallel.compile=false" in problem


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_word_shards(tmp_path_factory.mktemp("corpus"))


def cli_losses(shards, run_dir, *overrides: str) -> dict[int, float]:
    args = tiny_args(shards, run_dir, "model.dropout=0.0", "train.max_steps=3",
                     "checkpoint.every=3", *overrides)
    assert cli_main(["train", *args]) == 0
    return train_losses(run_dir)


def assert_same_losses(compiled: dict[int, float], eager: dict[int, float]) -> None:
    assert compiled.keys() == eager.keys() and len(eager) == 3
    assert all(compiled[k] == pytest.approx(eager[k], rel=1e-5) for k in eager)


def test_cli_run_with_compile_trains_like_eager(shards, tmp_path, monkeypatch):
    """parallel.compile=true through the CLI, config to checkpoint, in two_pass mode (B and 2B
    rows; traced with aot_eager here, the inductor run is the slow test below); dropout off:
    inductor draws its own random numbers."""
    monkeypatch.setattr("parallel.compile.COMPILE_BACKEND", "aot_eager")
    eager = cli_losses(shards, tmp_path / "eager", "train.step_mode=two_pass")
    compiled = cli_losses(shards, tmp_path / "compiled", "train.step_mode=two_pass", "parallel.compile=true")
    assert_same_losses(compiled, eager)
    assert graphs() > 0
    load_model(tmp_path / "compiled", use_ema=False)  # its names are the plain model's (DCP: a missing one raises)


@pytest.mark.slow
def test_cli_run_with_inductor_compile_trains_like_eager(shards, tmp_path):
    eager = cli_losses(shards, tmp_path / "eager", "train.step_mode=two_pass")
    compiled = cli_losses(shards, tmp_path / "compiled", "train.step_mode=two_pass", "parallel.compile=true")
    assert_same_losses(compiled, eager)


def assert_compiled(result) -> None:
    """Every rank of the launch compiled graphs (none: its blocks ran eagerly)."""
    counts = [int(line.rsplit(":", 1)[1]) for line in result.stdout.splitlines() if "compiled graphs:" in line]
    assert len(counts) == 2 and all(count > 0 for count in counts), result.stdout[-2000:]


LAYOUTS = {"fsdp_dp2_reuse": ("reuse", ["parallel.dp=2"]), "fsdp_dp2_two_pass": ("two_pass", ["parallel.dp=2"]),
           "pp2_checkpointed_two_pass": ("two_pass", ["parallel.pp=2", "parallel.activation_checkpointing=true"])}


@pytest.mark.distributed
@pytest.mark.parametrize("step_mode, layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_compiled_blocks_under_fsdp_and_pipeline_train_like_one_eager_process(shards, tmp_path, monkeypatch,
                                                                              step_mode, layout):
    """Two processes with compiled blocks (aot_eager) give one eager process's losses: FSDP2 wraps
    the compiled blocks, a pipeline stage compiles the blocks it holds."""
    monkeypatch.setenv("PROSECO_COMPILE_BACKEND", "aot_eager")
    mode = f"train.step_mode={step_mode}"
    eager = cli_losses(shards, tmp_path / "eager", mode)
    args = tiny_args(shards, tmp_path / "compiled", "model.dropout=0.0", "train.max_steps=3", "checkpoint.every=3",
                     mode, "parallel.compile=true", *layout)
    assert_compiled(torchrun(2, WORKER, "train", *args))
    assert_same_losses(train_losses(tmp_path / "compiled"), eager)


@pytest.mark.distributed
@pytest.mark.skipif(find_spec("deepspeed") is None, reason="deepspeed is not installed (extra: deepspeed)")
def test_compiled_blocks_under_deepspeed_zero_2_train_like_eager_zero_2(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("PROSECO_COMPILE_BACKEND", "aot_eager")
    zero_2 = ["parallel.engine=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2.json"]
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["parallel.compile=true"])):
        args = tiny_args(shards, tmp_path / name, "model.dropout=0.0", "train.max_steps=3", "checkpoint.every=3",
                         "train.step_mode=two_pass", *zero_2, *extra)
        result = torchrun(2, WORKER, "train", *args)
        losses[name] = train_losses(tmp_path / name)
    assert_compiled(result)
    assert_same_losses(losses["compiled"], losses["eager"])
