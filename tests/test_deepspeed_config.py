"""The DeepSpeed engine's config, checked before any process group (no DeepSpeed import needed):
bad combinations rejected with the reason and the fix, the shipped JSONs valid, the launcher's
--local_rank flag accepted, and the stop file that stands in for a signal."""

import json
from pathlib import Path

import pytest

from parallel.deepspeed_engine import RunSettings, deepspeed_json_problems, engine_config, partition_bounds
from pretrain.cli import build_parser, parse_args
from pretrain.config import ConfigError, load_config, validate
from pretrain.train import PreemptionFlag, Trainer, trainer_class

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = ["parallel.engine=deepspeed", f"parallel.deepspeed_config={ROOT / 'configs/deepspeed/zero2.json'}",
             "data.global_batch_size=8", "data.micro_batch_size=2"]


def problems(overrides: list[str], world: int = 2) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(load_config(None, [*DEEPSPEED, *overrides]), world_size=world)
    return str(caught.value)


@pytest.mark.parametrize("overrides, world, needle", [
    (["parallel.tp=2"], 4, "parallel.engine=deepspeed runs data-parallel layouts only"),
    (["parallel.pp=2", "train.step_mode=two_pass"], 4, "got tp=1 pp=2; set parallel.tp=1 parallel.pp=1"),
    (["parallel.param_dtype=bf16"], 2, "precision comes from the DeepSpeed JSON"),
    (["checkpoint.async_save=true"], 2, "saves synchronously"),
    (["train.precision=bf16"], 2, "has bf16 disabled: set train.precision=fp32"),
    (["parallel.deepspeed_config=/nonexistent/ds.json"], 2, "cannot be read"),
])
def test_bad_combinations_are_rejected_with_the_fix(overrides, world, needle):
    assert needle in problems(overrides, world)


@pytest.mark.parametrize("content, needle", [
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, "sets 'optimizer', which this run config "
                                                                         "owns: remove it and set optim.lr"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}, "set optim.grad_clip"),
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 64}, "set data.global_batch_size"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {}}, "optim.warmup_steps"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16 loss scaling is not supported"),
    ({"zero_optimization": {"stage": 4}}, "stage must be 1, 2 or 3, got 4"),
    ({"bf16": {"enabled": True}}, "stage must be 1, 2 or 3, got None"),
])
def test_the_json_may_not_own_what_the_run_config_owns(tmp_path, content, needle):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    assert needle in problems([f"parallel.deepspeed_config={path}"])


def test_unparsable_json_is_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{stage: 2")
    assert "is not valid JSON" in problems([f"parallel.deepspeed_config={path}"])


def test_shipped_deepspeed_configs_are_valid_and_completed_from_the_run_config():
    shipped = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))
    assert {p.stem for p in shipped} >= {"zero1", "zero2", "zero3", "zero2-offload", "zero3-bf16-offload"}
    run = RunSettings(micro_batch_size=2, accumulation=3, dp=4, lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                      weight_decay=0.1, grad_clip=1.0)
    for path in shipped:
        assert deepspeed_json_problems(path) == [], path
        cfg = engine_config(json.loads(path.read_text()), run)
        assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"], cfg["gradient_clipping"]) == (24, 3, 1.0)
        assert cfg["optimizer"]["params"]["torch_adam"] and cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
        assert "scheduler" not in cfg
        assert cfg.get("bf16", {}).get("check_grad_overflow", True)  # bf16: a non-finite step is skipped
    validate(load_config(None, DEEPSPEED), world_size=2)


def test_the_engine_is_chosen_by_the_config():
    assert trainer_class(load_config(None, [])) is Trainer
    deepspeed = trainer_class(load_config(None, DEEPSPEED))
    assert issubclass(deepspeed, Trainer) and deepspeed.__name__ == "DeepSpeedTrainer"


def test_the_deepspeed_launchers_local_rank_flag_is_accepted():
    """`deepspeed --module pretrain.cli train CFG` runs `python -m pretrain.cli --local_rank=N train CFG`."""
    for flag in (["--local_rank=1"], ["--local_rank", "0"], ["--local-rank=3"]):
        args = parse_args(build_parser(), [*flag, "train", "cfg.yaml", "train.max_steps=2"])
        assert args.config == "cfg.yaml" and args.overrides == ["train.max_steps=2"]


def test_zero3_partitions_cover_each_parameter_once():
    for numel, world in ((10, 3), (7, 2), (1, 4), (8, 2)):
        bounds = [partition_bounds(numel, world, rank) for rank in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_a_stop_file_asks_for_a_checkpoint_like_a_signal(tmp_path):
    stop = tmp_path / "stop"
    flag = PreemptionFlag(str(stop))
    try:
        assert not flag.agreed()
        stop.touch()
        assert flag.agreed() and flag.describe() == f"stop file {stop}"
    finally:
        flag.restore()
