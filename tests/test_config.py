"""Typed config: YAML + overrides, errors that name the field and the fix, the reference docs."""

import dataclasses
import subprocess
import sys
import typing
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
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path)  # a folder


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
    (["sampling.early_eos_stop=true"], 1, "needs sampling.block_length"),
    (["sampling.unmasking=confidence", "sampling.block_length=8"], 1, "block mode (sampling.block_length) always"),
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
    old["parallel"]["zero_stage"] = 2  # a field this version does not have
    with pytest.warns(UserWarning, match="ignoring config field parallel.zero_stage"):
        cfg = load_config_dict(old, drop_unknown=True)
    assert cfg == RunConfig()
    with pytest.raises(ConfigError, match="unknown config field parallel.zero_stage"):
        load_config_dict(old)


# Bad configs that today's code accepted and training then tripped over (some hung): each is
# rejected by `proseco config show`, exit code 2, one line per problem naming the field.
BAD_OVERRIDES = [
    (["data.global_batch_size=0"], "data.global_batch_size must be >= 1, got 0"),
    (["data.global_batch_size=-8"], "data.global_batch_size must be >= 1, got -8"),
    (["logging.log_every=0"], "logging.log_every must be >= 1, got 0; set it to an integer >= 1, e.g. the default 10"),
    (["train.seed=-1"], "train.seed must be >= 0, got -1"),
    (["optim.eps=-1e-8"], "optim.eps must be positive, got -1e-08"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0, got -0.1"),
    (["optim.lr=inf"], "optim.lr must be a finite number, got inf; set it to a number > 0, e.g. the default 0.0003"),
    (["optim.lr=.nan"], "optim.lr must be a finite number, got nan"),
    (["optim.betas=[0.9, .inf]"], "optim.betas[1] must be a finite number, got inf"),
    (["diffusion.sigma_max=.inf"], "diffusion.sigma_max must be a finite number, got inf"),
    (["model.rope_base=0"], "model.rope_base must be > 1, got 0.0"),
    (["model.seq_len=0"], "model.seq_len must be >= 1 or null, got 0"),
    (["train.max_steps=100000000000000000000"], "train.max_steps must fit in 64 bits"),
    (["model.d_model=1" + "0" * 400], "model.d_model must fit in 64 bits"),
    (["model.d_model=1" + "0" * 5000], "override 'model.d_model=1000"),
    (["model.d_model=1048576", "model.n_heads=4"], "parameters, beyond any machine"),
    (["model.n_layers=1000000000"], "parameters, beyond any machine"),
    (["model.mlp_ratio=1000000000000000000"], "parameters, beyond any machine"),
    (["model.seq_len=1000000000000"], "activations, beyond any machine"),
    (["model.vocab_size=1000000000000"], "parameters, beyond any machine"),
    (["parallel.pp_layers_per_stage=[0, 4]", "parallel.pp=2", "train.step_mode=two_pass"],
     "parallel.pp_layers_per_stage[0] must be >= 1, got 0"),
    (["optim.lr=[1"], "override 'optim.lr=[1': not valid YAML"),
    (["optim={lr: 1, lr: 2}"], "override 'optim={lr: 1, lr: 2}': duplicate key lr"),
    (["logging.run_dir=caf\udce9"], "is not UTF-8 text"),
]


def config_show(capsys, *args: str) -> tuple[int, str]:
    """`proseco config show ARGS` in this process: its exit code and stderr."""
    from pretrain.cli import main

    code = main(["config", "show", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("overrides, needle", BAD_OVERRIDES, ids=[" ".join(o)[:40] for o, _ in BAD_OVERRIDES])
def test_config_show_rejects_bad_values_naming_the_field(capsys, overrides, needle):
    code, err = config_show(capsys, *overrides)
    assert code == 2 and err.startswith("proseco: error: ") and "Traceback" not in err
    assert needle in err


def bad_file(tmp_path, data: bytes) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data, needle", [
    (b"optim:\n  lr: 1.0e-3\ntrain:\n  max_steps: 5\noptim:\n  eps: 1.0e-6\n", "bad.yaml:5: duplicate key optim"),
    (b"model:\n  d_model: 64\n  n_layers: 2\n  d_model: 128\n", "bad.yaml:4: duplicate key d_model"),
    (b"name: caf\xe9\n", "bad.yaml:1: config file is not UTF-8 text (byte 0xe9)"),
    (b"", "is empty; pass a YAML mapping of sections or omit the file to use the defaults"),
    (b"# only a comment\n\n", "is empty"),
    (b"optim:\n  lr: [1\ntrain: 3\n", "bad.yaml:3:"),
    (b"model:\n  d_model: 1" + b"0" * 5000 + b"\n", "bad.yaml: not valid YAML"),
], ids=["duplicate-section", "duplicate-field", "latin-1", "empty", "only-comments", "syntax", "5000-digits"])
def test_config_files_are_read_strictly(capsys, tmp_path, data, needle):
    code, err = config_show(capsys, str(bad_file(tmp_path, data)))
    assert code == 2 and "Traceback" not in err
    assert needle in err


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = bad_file(tmp_path, b"model:\n  <<: {n_layers: 2, d_model: 64}\n  d_model: 128\n")
    assert load_config(path).model.d_model == 128


def test_a_duplicate_key_in_a_real_process(tmp_path):
    path = bad_file(tmp_path, b"optim:\n  lr: 1.0e-3\noptim:\n  eps: 1.0e-6\n")
    result = subprocess.run([sys.executable, "-m", "pretrain", "config", "show", str(path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}:3: duplicate key optim" in result.stderr


def numeric(hint) -> bool:
    """int or float, also inside `X | None`, lists and tuples."""
    return hint in (int, float) or any(numeric(arg) for arg in typing.get_args(hint))


def test_every_number_declares_its_range():
    from parallel.ranges import BOUNDS

    cfg = RunConfig()
    for section in (cfg.model, cfg.diffusion, cfg.data, cfg.optim, cfg.train, cfg.parallel, cfg.checkpoint,
                    cfg.logging, cfg.sampling):
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            if numeric(hints[f.name]):
                assert f.metadata and set(f.metadata) <= set(BOUNDS), f"{type(section).__name__}.{f.name}"
    assert "| `global_batch_size` | int | `32` | >= 1 |" in reference_markdown()


def test_parameter_count_from_the_config_matches_the_model():
    from pretrain.models import ModelShape, count_parameters
    from pretrain.models.dit.config import DiTConfig, num_parameters
    from pretrain.models.dit.model import DiT

    for cfg in (DiTConfig(), DiTConfig(d_model=768, n_layers=12, n_heads=12, cond_dim=128, vocab_size=50258)):
        shape = ModelShape(vocab_size=cfg.min_vocab_rows(), seq_len=16)
        assert num_parameters(cfg, shape.vocab_size) == count_parameters(DiT(cfg, shape, device="meta"))


def test_machine_checks_at_train_start(capsys, tmp_path, monkeypatch):
    import torch

    from pretrain.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    safe = [f"data.shards={tmp_path}/no-shards", f"logging.run_dir={tmp_path}/run"]  # fail fast if unchecked
    for overrides, needle in [
        (["model.attention=flash"], "model.attention=flash needs CUDA"),
        (["train.device=cuda"], "train.device=cuda but CUDA is not available; use train.device=auto or cpu"),
        ([f"logging.run_dir={taken}"], f"logging.run_dir={taken}: {taken} is an existing file"),
        ([f"logging.run_dir={taken}/run"], f"{taken} is an existing file"),
    ]:
        assert main(["train", *safe, *overrides]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
