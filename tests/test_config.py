"""Typed config: YAML + overrides, errors that name the field and the fix, the reference docs."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.config import (
    ConfigError,
    RunConfig,
    field_docs,
    grad_accum_steps,
    load_config,
    reference_markdown,
    to_dict,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, {"model": {"n_layers": 6}, "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}})
    cfg = load_config(path, ["model.n_layers=8", "diffusion.corrector_input=masked", "optim.lr=2e-4",
                             "parallel.pp_layers_per_stage=[4,4]", "model.vocab_size=null"])
    assert cfg.model.n_layers == 8 and cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.diffusion.corrector_input == "masked" and cfg.parallel.pp_layers_per_stage == [4, 4]
    assert cfg.model.vocab_size is None
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)  # ints are accepted for floats


def test_defaults_reproduce_the_released_owt_switches():
    d = RunConfig().diffusion
    assert d.corrector_training and d.corrector_input == "all" and d.corrector_prior == "argmax"
    assert d.weighted_corrector_loss and d.corrector_errors_upweighted
    assert d.mdlm_loss_weight == 1.0 and d.corrector_loss_weight == 1.0 and d.corrector_training_start_step == 0
    assert d.sampling_eps_training == 0.1 and d.sampling_eps_validation == 1e-3
    assert d.noise_schedule == "loglinear" and not RunConfig().model.time_conditioning


@pytest.mark.parametrize("overrides, needle", [
    (["model.n_layer=4"], "unknown config field model.n_layer; did you mean model.n_layers?"),
    (["modle.n_layers=4"], "unknown config field modle"),
    (["model.n_layers=four"], "model.n_layers must be an integer, got 'four'"),
    (["model.dropout=true"], "model.dropout must be a number"),
    (["train.step_mode=fast"], "train.step_mode must be one of 'two_pass', 'reuse'"),
    (["optim.betas=[0.9]"], "optim.betas must have 2 entries"),
    (["model.n_layers"], "is not of the form section.field=value"),
])
def test_reading_errors_name_the_field(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_unknown_yaml_key(tmp_path):
    needle = "unknown config field data.global_batch; did you mean data.global_batch_size"
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, {"data": {"global_batch": 8}}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("overrides, world, needle", [
    (["model.n_heads=6", "parallel.tp=4"], 4, "model.n_heads=6 is not divisible by parallel.tp=4"),
    (["model.n_layers=5", "parallel.pp=2", "train.step_mode=two_pass"], 2,
     "model.n_layers=5 is not divisible by pp * pp_virtual_stages = 2"),
    (["data.global_batch_size=30", "data.micro_batch_size=4"], 2,
     "data.global_batch_size=30 is not divisible by dp x micro_batch_size = 2 x 4"),
    (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by parallel.tp * parallel.pp = 4"),
    (["parallel.pp=2"], 2, "train.step_mode=reuse needs the whole model in one stage"),
    (["parallel.dp=4"], 2, "parallel.dp * tp * pp = 4 but 2 processes"),
    (["diffusion.mdlm_loss_weight=0", "diffusion.corrector_loss_weight=0"], 1, "give a zero loss"),
    (["model.d_model=100", "model.n_heads=3"], 1, "model.d_model=100 is not divisible by model.n_heads=3"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "train.step_mode=two_pass"], 2,
     "interleaved_1f1b needs parallel.pp_virtual_stages >= 2"),
    (["sampling.corrector_sampling=select_top_k"], 1, "needs sampling.corrector_top_k > 0"),
])
def test_impossible_combinations_are_rejected(overrides, world, needle):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert needle in str(err.value)


def test_all_problems_reported_at_once():
    cfg = load_config(None, ["model.n_heads=6", "parallel.tp=4", "optim.lr=-1"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=4)
    assert "n_heads" in str(err.value) and "optim.lr must be positive" in str(err.value)


def test_accumulation_steps():
    cfg = load_config(None, ["data.global_batch_size=64", "data.micro_batch_size=8"])
    validate(cfg, world_size=2)
    assert grad_accum_steps(cfg, 2) == 4


def test_every_field_is_documented_and_shipped_configs_are_valid():
    cfg = RunConfig()
    for section, value in to_dict(cfg).items():
        if isinstance(value, dict):
            docs = field_docs(type(getattr(cfg, section)))
            assert set(docs) == set(value), f"undocumented fields in {section}: {set(value) - set(docs)}"
    assert "| `corrector_errors_upweighted` |" in reference_markdown()
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), "run `make docs`"
    for path in sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "experiments" / "configs").glob("*.yaml")):
        validate(load_config(path), world_size=1)


def test_cli_prints_one_line_error_and_exit_code_2():
    result = subprocess.run([sys.executable, "-m", "pretrain.cli", "config", "show", "model.n_heads=5"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "model.d_model=256 is not divisible by model.n_heads=5" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "pretrain", "config", "show", "model.n_layers=3"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["model"]["n_layers"] == 3


def test_model_family_is_chosen_by_name():
    cfg = load_config(None, ["model.family=dit", "model.d_model=64"])
    assert type(cfg.model).__name__ == "DiTConfig" and cfg.model.d_model == 64
    assert to_dict(cfg)["model"]["family"] == "dit"
    with pytest.raises(ConfigError, match="model.family='llama' is not a model family; known: dit"):
        load_config(None, ["model.family=llama"])
    with pytest.raises(ConfigError, match="unknown config field model.n_experts"):
        load_config(None, ["model.n_experts=8"])  # fields are the family's own


def test_configs_saved_by_older_versions_still_load():
    from pretrain.config import load_config_dict

    old = to_dict(RunConfig())
    old["parallel"]["engine"] = "native"  # a field an earlier version had
    with pytest.warns(UserWarning, match="ignoring config field parallel.engine"):
        cfg = load_config_dict(old, drop_unknown=True)
    assert cfg == RunConfig()
    with pytest.raises(ConfigError, match="unknown config field parallel.engine"):
        load_config_dict(old)
