"""Cross-field checks of a run config, before any process group exists.

`validate()` reports every problem at once, each naming the field and the fix: the application's
sections here, the parallel layout by the parallel library (`ParallelConfig.problems`), the model
by its family (`ModelConfig.problems`; the family's parallel plan for what tp/pp need of it).
"""

from __future__ import annotations

from pretrain.config.schema import RunConfig
from pretrain.errors import ConfigError


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step."""
    return cfg.data.global_batch_size // (cfg.parallel.resolve_dp(world_size) * cfg.data.micro_batch_size)


def validate(cfg: RunConfig, world_size: int = 1) -> None:
    """Every check that needs no process group; raises one ConfigError listing all problems."""
    problems = (_model_problems(cfg) + _diffusion_problems(cfg) + _layout_problems(cfg, world_size)
                + _optim_problems(cfg) + _run_problems(cfg) + _sampling_problems(cfg))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _checks(*pairs: tuple[bool, str]) -> list[str]:
    """The messages of the checks that failed."""
    return [message for ok, message in pairs if not ok]


def _model_problems(cfg: RunConfig) -> list[str]:
    m, tp = cfg.model, cfg.parallel.tp
    return m.problems() + m.layout_problems(tp) + _checks(
        (m.vocab_size is None or m.vocab_size > 1, "model.vocab_size must be at least 2 (or null: from the tokenizer)"),
        (m.vocab_multiple >= 1, "model.vocab_multiple must be >= 1"),
        (tp < 1 or m.vocab_multiple % tp == 0,
         f"model.vocab_multiple={m.vocab_multiple} is not divisible by parallel.tp={tp}; make it a multiple of tp "
         "so the padded vocabulary splits evenly"),
        (m.seq_len is None or m.seq_len > 0, "model.seq_len must be positive (or null: from the shards)"))


def _diffusion_problems(cfg: RunConfig) -> list[str]:
    d = cfg.diffusion
    return _checks(
        (0.0 < d.schedule_eps < 1.0, f"diffusion.schedule_eps={d.schedule_eps} must be in (0, 1)"),
        (0.0 < d.sigma_min < d.sigma_max, "diffusion.sigma_min must be positive and below diffusion.sigma_max"),
        *((0.0 <= getattr(d, name) < 1.0, f"diffusion.{name} must be in [0, 1)")
          for name in ("sampling_eps_training", "sampling_eps_validation")),
        (d.mdlm_loss_weight >= 0 and d.corrector_loss_weight >= 0, "diffusion loss weights must be >= 0"),
        (d.mdlm_loss_weight > 0 or (d.corrector_training and d.corrector_loss_weight > 0),
         "diffusion.mdlm_loss_weight and diffusion.corrector_loss_weight give a zero loss "
         "(the official config's defaults); set them to 1.0 as the released runs do"))


def _layout_problems(cfg: RunConfig, world_size: int) -> list[str]:
    """The parallel layout (checked by the parallel library) and how the batch splits over it."""
    p, data = cfg.parallel, cfg.data
    problems = p.problems(world_size, cfg.model.num_layers) + _checks(
        (p.pp == 1 or cfg.train.step_mode == "two_pass",
         "train.step_mode=reuse needs the whole model in one stage; with parallel.pp > 1 use train.step_mode=two_pass"),
        (data.micro_batch_size >= 1, "data.micro_batch_size must be >= 1"),
        (data.num_workers >= 0, "data.num_workers must be >= 0"),
        (0.0 <= data.max_corrupt_fraction < 1.0, "data.max_corrupt_fraction must be in [0, 1)"))
    if data.micro_batch_size < 1:
        return problems
    dp = p.dp if p.dp > 0 else max(world_size // (max(p.tp, 1) * max(p.pp, 1)), 1)
    per_step = dp * data.micro_batch_size
    if data.global_batch_size % per_step:
        return problems + [f"data.global_batch_size={data.global_batch_size} is not divisible by dp x "
                           f"micro_batch_size = {dp} x {data.micro_batch_size}; make it a multiple of {per_step}"]
    return problems + p.microbatch_problems(data.global_batch_size // per_step)


def _optim_problems(cfg: RunConfig) -> list[str]:
    o = cfg.optim
    return _checks(
        (o.lr > 0, "optim.lr must be positive"),
        (o.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (0.0 <= o.ema_decay < 1.0, "optim.ema_decay must be in [0, 1)"),
        (o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)"),
        (0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]"),
        (all(0.0 <= b < 1.0 for b in o.betas), "optim.betas must be in [0, 1)"))


def _run_problems(cfg: RunConfig) -> list[str]:
    t, c = cfg.train, cfg.checkpoint
    return _checks(
        (t.max_steps >= 1, "train.max_steps must be >= 1"),
        (t.eval_every >= 0 and t.eval_batches >= 0, "train.eval_every and train.eval_batches must be >= 0"),
        (c.every >= 0 and c.keep_last >= 1, "checkpoint.every must be >= 0 and checkpoint.keep_last >= 1"),
        (c.keep_every >= 0, "checkpoint.keep_every must be >= 0 (0: keep only the last checkpoint.keep_last)"))


def _sampling_problems(cfg: RunConfig) -> list[str]:
    s = cfg.sampling
    return _checks(
        (s.steps >= 1, "sampling.steps must be >= 1"),
        (0.0 < s.nucleus_p <= 1.0, "sampling.nucleus_p must be in (0, 1]"),
        (s.corrector_steps >= 0 and s.corrector_every >= 1,
         "sampling.corrector_steps must be >= 0 and sampling.corrector_every >= 1"),
        (s.corrector_sampling != "select_top_k" or s.corrector_top_k > 0,
         "sampling.corrector_sampling=select_top_k needs sampling.corrector_top_k > 0"),
        (s.block_length is None or s.block_length >= 1, "sampling.block_length must be >= 1 or null"),
        (s.temperature >= 0, "sampling.temperature must be >= 0"),
        (s.batch_size >= 1 and s.num_samples >= 1, "sampling.batch_size and sampling.num_samples must be >= 1"))
