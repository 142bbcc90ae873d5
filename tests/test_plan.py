"""`proseco plan`: memory per rank against what a training step really takes on CPU, the verdict
on a layout that cannot fit, and the command end to end on the OWT recipe."""

from __future__ import annotations

import json

import pytest

from benchmarks.plan_memory import COMMON, CONFIGS, SEQ_LEN, TWO_RANK_CONFIGS, planned, run_worker
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.errors import ConfigError
from pretrain.plan import Assumptions, plan_config
from pretrain.plan.families import family_plan
from tests.helpers import make_word_shards, torchrun

OWT = ["configs/owt-proseco.yaml", "model.vocab_size=50258", "model.seq_len=1024"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_word_shards(tmp_path_factory.mktemp("plan"), seq_len=SEQ_LEN)


def _plan(shards, overrides, world_size=1):
    cfg = load_config(None, [*COMMON, *overrides, f"data.shards={shards}"])
    return plan_config(cfg, world_size, Assumptions(device="cpu"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_agrees_with_measured_cpu_memory(shards, tmp_path, name):
    measured = run_worker(shards, CONFIGS[name], tmp_path / "run")[0]
    plan = _plan(shards, CONFIGS[name]).summary()
    # The state before the second step: parameters, AdamW moments and EMA (gradients were set to
    # None by zero_grad), plus a batch and the rotary tables.
    held = plan["parameters_bytes"] + plan["optimizer_bytes"] + plan["ema_bytes"]
    assert measured["second_step_start_bytes"] == pytest.approx(held, rel=0.02)
    assert plan["peak_bytes"] == pytest.approx(measured["peak_bytes"], rel=0.15), (name, plan, measured)
    # Activations are most of these steps' peak: the agreement is not the model state's alone.
    assert measured["peak_bytes"] - held > 0.4 * measured["peak_bytes"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(TWO_RANK_CONFIGS))
def test_plan_agrees_with_measured_cpu_memory_on_two_ranks(shards, tmp_path, name):
    """FSDP2 sharded and replicated, two 1F1B stages, tensor-parallel shards, FSDP2 in reuse mode
    with activation checkpointing, where the y graph's buffered gradients are of the unsharded
    parameters, and FSDP2 accumulating unsharded gradients over two micro-batches (~10-25 s each)."""
    measured = run_worker(shards, TWO_RANK_CONFIGS[name], tmp_path / "run", world_size=2)
    plans = planned(shards, TWO_RANK_CONFIGS[name], world_size=2)
    for got, plan in zip(measured, plans, strict=True):
        assert plan == pytest.approx(got["peak_bytes"], rel=0.15), (name, got, plans)


def test_reuse_buffers_the_y_graph_gradients_through_backward(shards, tmp_path):
    """Reuse mode with activation checkpointing and two micro-batches: the y graph's gradients,
    buffered until the z_t graph's backward delivers its part, are added to the .grad the first
    micro-batch left; two_pass (one graph) has none. The plan has both peaks within 15 %, and the
    buffer is too large a share of the reuse peak for that to hold without it."""
    reuse = CONFIGS["dit_reuse_ac_accum"]
    two_pass = [*reuse, "train.step_mode=two_pass"]
    measured = {mode: run_worker(shards, overrides, tmp_path / mode)[0]["peak_bytes"]
                for mode, overrides in (("reuse", reuse), ("two_pass", two_pass))}
    plans = {"reuse": _plan(shards, reuse).busiest, "two_pass": _plan(shards, two_pass).busiest}
    for mode, rank in plans.items():
        assert rank.total == pytest.approx(measured[mode], rel=0.15), (mode, rank, measured)
    assert plans["two_pass"].reuse_gradients == 0
    assert plans["reuse"].reuse_at_peak > 0.15 * measured["reuse"]
    # What reuse takes over two_pass, planned against measured (two_pass's larger block backward
    # and graph of 2b rows offset part of the buffer in both).
    planned_gap = plans["reuse"].total - plans["two_pass"].total
    assert planned_gap == pytest.approx(measured["reuse"] - measured["two_pass"], abs=0.05 * measured["reuse"])


def test_the_reuse_buffer_is_of_unsharded_gradients_split_over_tp_only(shards):
    """Under FSDP2 the buffered y-graph gradients are of the gathered parameters: whole under
    fsdp and ddp alike, in parallel.param_dtype, split over tensor-parallel ranks; on one process
    they are only an addition when an earlier micro-batch left a .grad."""
    base = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.vocab_size=2048",
            "data.global_batch_size=8", "data.micro_batch_size=4", "parallel.activation_checkpointing=true"]
    params = _plan(shards, base).model.total_parameters
    fsdp = _plan(shards, [*base, "parallel.dp=2"], world_size=2).busiest
    assert fsdp.reuse_gradients == pytest.approx(4 * params)
    assert fsdp.gradients == pytest.approx(4 * params / 2)
    assert fsdp.accumulated_gradients == 0  # one micro-batch per rank: reduced in its own backward
    accumulating = _plan(shards, [*base, "parallel.dp=2", "data.micro_batch_size=2"], world_size=2).busiest
    assert accumulating.gradients + accumulating.accumulated_gradients == pytest.approx(4 * params)
    assert _plan(shards, [*base, "parallel.dp=2", "parallel.data_parallel=ddp"], world_size=2).busiest \
        .reuse_gradients == pytest.approx(4 * params)
    bf16 = _plan(shards, [*base, "parallel.dp=2", "parallel.param_dtype=bf16"], world_size=2).busiest
    assert bf16.reuse_gradients == pytest.approx(2 * params)
    model = _plan(shards, base).model
    tp = _plan(shards, [*base, "parallel.dp=2", "parallel.tp=2"], world_size=4).busiest
    assert tp.reuse_gradients == pytest.approx(4 * (params - model.other_parameters) / 2 + 4 * model.other_parameters)
    two_pass = _plan(shards, [*base, "parallel.dp=2", "train.step_mode=two_pass"], world_size=2).busiest
    assert two_pass.reuse_gradients == 0 and two_pass.total < fsdp.total
    assert _plan(shards, [*base, "data.micro_batch_size=8"]).busiest.reuse_gradients == 0  # the buffer is .grad
    assert _plan(shards, base).busiest.reuse_gradients == pytest.approx(4 * params)  # added to micro-batch 1's


@pytest.mark.slow
@pytest.mark.distributed
def test_llada_tensor_parallel_payloads_are_what_a_step_moves(shards, tmp_path):
    """The plan's LLaDA count (three q/k/v inputs and two SwiGLU inputs reduced per block in
    backward) against every collective of a step at tp=2, with and without sequence parallelism."""
    out = tmp_path / "comm.json"
    torchrun(2, "benchmarks/plan_comm_worker.py", str(shards), str(out))
    for result in json.loads(out.read_text()):
        # Beyond the count: the step's metric and gradient-norm reductions, a few scalars.
        assert result["bytes"].keys() == result["plan"].keys()
        for kind, planned_bytes in result["plan"].items():
            assert 0 <= result["bytes"][kind] - planned_bytes <= 64, result


def test_parameter_places_add_up_to_the_family_count():
    from pretrain.models.dit.config import DiTConfig
    from pretrain.models.dit.config import num_parameters as dit_count
    from pretrain.models.llada.config import LLaDAConfig
    from pretrain.models.llada.config import num_parameters as llada_count

    dit = DiTConfig(d_model=96, n_layers=3, n_heads=4, cond_dim=32)
    llada = LLaDAConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=320)
    assert family_plan(dit, 512, "fp32").total_parameters == dit_count(dit, 512)
    assert family_plan(llada, 512, "bf16").total_parameters == llada_count(llada, 512)


def test_layout_rules_move_memory_the_way_they_should(shards):
    base = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.vocab_size=2048",
            "data.global_batch_size=16", "data.micro_batch_size=2"]
    ddp = _plan(shards, [*base, "parallel.data_parallel=ddp"], world_size=4).busiest
    fsdp = _plan(shards, [*base, "parallel.data_parallel=fsdp"], world_size=4).busiest
    assert fsdp.state == pytest.approx(ddp.state / 4)
    stored = _plan(shards, base).busiest
    checkpointed = _plan(shards, [*base, "parallel.activation_checkpointing=true"]).busiest
    assert checkpointed.total < stored.total
    assert stored.activations_checkpointed == pytest.approx(checkpointed.activations_checkpointed)
    # reuse keeps two graphs of b rows, two_pass one of 2b: the same blocks' activations.
    two_pass = _plan(shards, [*base, "train.step_mode=two_pass"]).busiest
    assert two_pass.activations == pytest.approx(stored.activations)
    # 1F1B: the first of 4 stages holds 4 micro-batches in flight, the last one.
    staged = _plan(shards, [*base, "parallel.pp=4", "train.step_mode=two_pass", "data.micro_batch_size=1"],
                   world_size=4)
    assert [rank.in_flight for rank in staged.ranks] == [4, 3, 2, 1]


def test_a_layout_that_cannot_fit_is_flagged_with_what_to_change(capsys):
    code = main(["plan", *OWT, "--world-size", "8", "--device-memory", "16"])
    err = capsys.readouterr().err
    assert code == 1
    assert "DOES NOT FIT" in err
    lines = {line.split()[0]: line for line in err.splitlines() if line.startswith("  ")}
    assert "fits" in lines["parallel.activation_checkpointing=true"]
    assert "still too large" in lines["parallel.data_parallel=fsdp"]


def test_a_layout_too_large_for_the_reuse_buffer_is_offered_two_pass(capsys):
    """LLaDA-8B on 8 devices of 40 GiB, fsdp with checkpointing and one sequence per rank: the y
    graph's unsharded bf16 gradients (15 GiB) do not fit beside the rest; two_pass does."""
    from pretrain.plan.scaling import LLADA

    code = main(["plan", *LLADA[1], "parallel.activation_checkpointing=true", "data.micro_batch_size=1",
                 "data.global_batch_size=8", "--world-size", "8", "--device-memory", "40"])
    captured = capsys.readouterr()
    assert code == 1
    buffered = next(line for line in captured.out.splitlines() if "y-graph gradients buffered" in line)
    assert float(buffered.split()[-1]) == pytest.approx(2 * 8_015_581_184 / 2**30, abs=0.01)  # bf16, unsharded
    lines = {line.split()[0]: line for line in captured.err.splitlines() if line.startswith("  ")}
    assert "fits" in lines["train.step_mode=two_pass"] and "still" not in lines["train.step_mode=two_pass"]


def test_the_owt_recipe_end_to_end(capsys):
    assert main(["plan", *OWT, "--world-size", "64", "--device-memory", "80", "parallel.tp=2",
                 "data.micro_batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "dp=32 (ddp) x tp=2 x pp=1 = 64 devices" in out
    assert "169,697,920 parameters" in out  # the paper's DiT small with the padded GPT-2 vocabulary
    assert "step time:" in out and out.rstrip().endswith("fits")
    # Without the vocabulary (the shards are not here) the command says what to set.
    assert main(["plan", "configs/owt-proseco.yaml", "--world-size", "8", "--device-memory", "80"]) == 2
    assert "model.vocab_size" in capsys.readouterr().err
    assert main(["plan", *OWT, "--world-size", "8", "--device-memory", "1"]) == 2
    assert "--device-memory (1 GiB) must exceed --reserve" in capsys.readouterr().err


def test_an_invalid_layout_is_a_config_error_and_bf16_adds_weight_copies(shards):
    with pytest.raises(ConfigError, match="parallel.tp"):
        _plan(shards, ["model.n_heads=4", "parallel.tp=8"], world_size=8)
    llada = ["model.family=llada", "model.n_heads=4", "model.d_model=128", "model.mlp_hidden_size=320"]
    fp32 = _plan(shards, llada)
    bf16 = _plan(shards, [*llada, "train.precision=bf16"])
    assert fp32.busiest.weight_casts == 0
    assert bf16.busiest.weight_casts == pytest.approx(2 * fp32.model.total_parameters)
    assert bf16.busiest.activations < fp32.busiest.activations


@pytest.mark.parametrize("mode", ["reuse", "two_pass"])
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.tp=2 parallel.sequence_parallel=true",
                                    "parallel.dp=4", "parallel.dp=4 parallel.data_parallel=ddp"])
def test_step_time_uses_the_communication_count_the_benchmark_measures(shards, monkeypatch, mode, layout):
    """The plan's payloads are benchmarks/comm_worker.analytic's (the count measured equal to every
    collective of a step), given the same shapes."""
    from types import SimpleNamespace

    from benchmarks import comm_worker
    from pretrain.plan import make_layout
    from pretrain.plan.timing import dp_payloads, tp_payloads

    overrides = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.cond_dim=64",
                 "model.vocab_size=64", "data.global_batch_size=16", "data.micro_batch_size=2",
                 f"train.step_mode={mode}", *layout.split()]
    plan = _plan(shards, overrides, world_size=4 if "dp=4" in layout else 2)
    cfg, ours = plan.cfg, make_layout(plan.cfg, plan.layout.world_size, "cpu")
    model = plan.model
    root = 4 * (model.embedding_parameters + model.head_parameters + model.other_parameters)
    blocks = 4 * model.num_layers * model.block_parameters
    # What comm_worker.fsdp_units measures on the wrapped model: each local part times dp (whole
    # under fsdp; under ddp, whose parts are whole already, dp times too large: analytic divides).
    replicated = ours.dp if cfg.parallel.data_parallel == "ddp" else 1
    monkeypatch.setattr(comm_worker, "fsdp_units", lambda part, dp: (root * replicated, blocks * replicated))
    trainer = SimpleNamespace(cfg=cfg, layout=SimpleNamespace(tp=ours.tp, dp=ours.dp), accum=ours.microbatches,
                              shape=SimpleNamespace(seq_len=ours.seq_len), parts=[None])
    expected = comm_worker.analytic(trainer, mode)
    payloads = tp_payloads("dit", ours, model.d_model, cfg.model.cond_dim, model.num_layers, True, True)
    for kind, nbytes in dp_payloads(ours, root, blocks).items():
        payloads[kind] += nbytes
    assert {k: v for k, v in payloads.items() if v} == pytest.approx(expected)
