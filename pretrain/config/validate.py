"""Checks of a run config before any process group exists.

`validate()` reports every problem at once, each naming the field and the fix: each number
against the range declared beside it (`parallel.ranges.field_problems`, one generic check for
every section), then the cross-field rules: the application's sections here, the parallel layout
by the parallel library (`ParallelConfig.problems`, its own ranges included), the model by its
family (`ModelConfig.problems`; the family's parallel plan for what tp/pp need of it).

`check_machine()` is what depends on the machine the run starts on (CUDA, the model's kernels, the
run folder): `proseco train` runs it after `validate()`, still before any process group. It is not
part of `validate()` because a config is often checked elsewhere, e.g. `proseco config show
--world-size 512` on a login node without GPUs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from parallel.config import ParallelConfig
from parallel.ranges import field_problems
from pretrain.config.schema import RunConfig
from pretrain.errors import ConfigError


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step."""
    return cfg.data.global_batch_size // (cfg.parallel.resolve_dp(world_size) * cfg.data.micro_batch_size)


def validate(cfg: RunConfig, world_size: int = 1) -> None:
    """Every check that needs no process group; raises one ConfigError listing all problems."""
    problems = (_range_problems(cfg) + _model_problems(cfg) + _diffusion_problems(cfg)
                + _layout_problems(cfg, world_size) + _engine_problems(cfg) + _sampling_problems(cfg)
                + _guidance_problems(cfg))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def check_machine(cfg: RunConfig) -> None:
    """What the run needs of this machine: CUDA where asked for, what the model's kernels need, a run
    folder that can be one; raises one ConfigError listing all problems."""
    import torch  # here, not at the top: reading and checking a config stays torch-free

    cuda = torch.cuda.is_available()
    problems = _checks((cfg.train.device != "cuda" or cuda,
                        "train.device=cuda but CUDA is not available; use train.device=auto or cpu"))
    device = "cuda" if cuda and cfg.train.device != "cpu" else "cpu"  # what init_distributed will pick
    problems += cfg.model.kernel_problems(device, cfg.train.precision)
    problems += _run_dir_problems(cfg.logging.run_dir)
    if problems:
        raise ConfigError("this machine cannot run the config:\n  - " + "\n  - ".join(problems))


def _checks(*pairs: tuple[bool, str]) -> list[str]:
    """The messages of the checks that failed."""
    return [message for ok, message in pairs if not ok]


def _range_problems(cfg: RunConfig) -> list[str]:
    """Each number of every section against its declared range, but parallel's, which
    `ParallelConfig.problems` checks itself (the library's config is complete without this app)."""
    found = field_problems(cfg, "")
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section) and not isinstance(section, ParallelConfig):
            found += field_problems(section, f"{f.name}.")
    return found


def _model_problems(cfg: RunConfig) -> list[str]:
    m, tp = cfg.model, cfg.parallel.tp
    return m.problems() + m.layout_problems(tp) + _checks(
        (tp < 1 or m.vocab_multiple % tp == 0,
         f"model.vocab_multiple={m.vocab_multiple} is not divisible by parallel.tp={tp}; make it a multiple of tp "
         "so the padded vocabulary splits evenly"))


def _diffusion_problems(cfg: RunConfig) -> list[str]:
    d = cfg.diffusion
    return _checks(
        (d.sigma_min < d.sigma_max, "diffusion.sigma_min must be below diffusion.sigma_max"),
        (d.mdlm_loss_weight > 0 or (d.corrector_training and d.corrector_loss_weight > 0),
         "diffusion.mdlm_loss_weight and diffusion.corrector_loss_weight give a zero loss "
         "(the official config's defaults); set them to 1.0 as the released runs do"))


def _layout_problems(cfg: RunConfig, world_size: int) -> list[str]:
    """The parallel layout (checked by the parallel library) and how the batch splits over it."""
    p, data = cfg.parallel, cfg.data
    problems = p.problems(world_size, cfg.model.num_layers) + _checks(
        (p.pp == 1 or cfg.train.step_mode == "two_pass",
         "train.step_mode=reuse needs the whole model in one stage; with parallel.pp > 1 use train.step_mode=two_pass"))
    if data.micro_batch_size < 1:  # out of range, reported above
        return problems
    dp = p.dp if p.dp > 0 else max(world_size // (max(p.tp, 1) * max(p.pp, 1)), 1)
    per_step = dp * data.micro_batch_size
    if data.global_batch_size % per_step:
        return problems + [f"data.global_batch_size={data.global_batch_size} is not divisible by dp x "
                           f"micro_batch_size = {dp} x {data.micro_batch_size}; make it a multiple of {per_step}"]
    return problems + p.microbatch_problems(data.global_batch_size // per_step)


def _engine_problems(cfg: RunConfig) -> list[str]:
    """What the DeepSpeed engine needs of the application's sections (the parallel library checks
    the layout and the JSON itself)."""
    if cfg.parallel.engine != "deepspeed":
        return []
    from parallel.deepspeed_engine import bf16_enabled, deepspeed_json_problems, read_deepspeed_json

    if deepspeed_json_problems(cfg.parallel.deepspeed_config):
        return []  # reported by ParallelConfig.problems
    bf16 = bf16_enabled(read_deepspeed_json(cfg.parallel.deepspeed_config))
    return _checks(
        (not cfg.checkpoint.async_save,
         "checkpoint.async_save is the native engine's (DCP); parallel.engine=deepspeed saves synchronously: set "
         "checkpoint.async_save=false"),
        (bf16 == (cfg.train.precision == "bf16"),
         f"train.precision={cfg.train.precision} but {cfg.parallel.deepspeed_config} has bf16 "
         f"{'enabled' if bf16 else 'disabled'}: set train.precision={'bf16' if bf16 else 'fp32'} or use a JSON "
         "whose bf16 section matches"))


def _sampling_problems(cfg: RunConfig) -> list[str]:
    s = cfg.sampling
    return _checks(
        (s.corrector_sampling != "select_top_k" or s.corrector_top_k > 0,
         "sampling.corrector_sampling=select_top_k needs sampling.corrector_top_k > 0"),
        (not s.early_eos_stop or s.block_length is not None,
         "sampling.early_eos_stop stops finished blocks: it needs sampling.block_length (or set it false)"),
        (s.unmasking == "posterior" or s.block_length is None,
         "sampling.unmasking=confidence is for the non-block sampler; block mode (sampling.block_length) always "
         "unmasks by confidence: drop one of them"))


def _guidance_problems(cfg: RunConfig) -> list[str]:
    """Classifier-free guidance: labels need a family with a label embedding; model.num_classes,
    sampling.label and sampling.guidance need a label set to have been trained on."""
    m, s, labels = cfg.model, cfg.sampling, cfg.data.labels
    if not hasattr(m, "num_classes"):
        return _checks((labels is None and s.label is None,
                        f"data.labels and sampling.label need a model with a class-label embedding; model.family="
                        f"{m.family} has none (use model.family=dit, or set data.labels and sampling.label to null)"))
    classes = m.num_classes  # None until the label set is read (pretrain.train.resolve_label_classes)
    return _checks(
        (labels is not None or not classes,
         f"model.num_classes={classes} but data.labels is null: name the label set to train on "
         "(data.labels=NAME, `proseco label`) or set model.num_classes=null"),
        (s.label is None or labels is not None,
         f"sampling.label={s.label} needs a model trained on labels (data.labels); set sampling.label=null"),
        (s.label is None or classes is None or s.label < classes,
         f"sampling.label={s.label} is not a class of the label set data.labels={labels} (classes 0.."
         f"{(classes or 1) - 1}); choose one of them"),
        (s.guidance == 1.0 or s.label is not None,
         f"sampling.guidance={s.guidance} guides towards a class: set sampling.label too (or sampling.guidance=1)"))


def _run_dir_problems(run_dir: str) -> list[str]:
    """logging.run_dir must be a folder or become one: the deepest part of it that exists must be a
    folder (a file there makes every write of the run fail)."""
    path = Path(run_dir)
    try:
        existing = next((part for part in (path, *path.parents) if part.exists()), None)
    except OSError as err:  # e.g. a parent this user may not enter
        return [f"logging.run_dir={run_dir} cannot be used: {err}; choose a folder this user can write"]
    if existing is None or existing.is_dir():
        return []
    return [f"logging.run_dir={run_dir}: {existing} is an existing file, not a folder; choose another "
            "logging.run_dir or move the file"]
