"""The training loop: `proseco train CONFIG [section.field=value ...]`.

Data flow of one optimizer step: the loader gives this rank's micro-batches of the global batch;
the objective masks them (keyed randomness), runs the two ProSeCo passes and returns per-token
losses; their sum over the whole global batch divided by its token count is the loss, so every
layout and accumulation schedule optimises the same number. Then: NaN/Inf guard, clipping, AdamW,
EMA. Around it: validation with EMA weights, atomic checkpoints, exact resume, preemption.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallel.env import DistEnv, detect_launch, init_distributed, shutdown
from parallel.gradients import clip_gradients, reduce_partial_gradients
from parallel.mesh import Layout, build_mesh, dp_group
from parallel.pipeline import PipelineRunner, stage_ids
from parallel.rng import seed_dropout
from parallel.runner import LocalRunner
from pretrain.checkpoint import Checkpointer, app_state, latest_checkpoint, load_app_state, read_meta, step_folders
from pretrain.checkpoint.folder import is_deepspeed_checkpoint
from pretrain.checkpoint.inference import refuse_resume_if_renamed
from pretrain.config import RunConfig, check_machine, grad_accum_steps, save_config, to_dict, validate
from pretrain.convert.hf_import import IMPORTED_KEY
from pretrain.convert.layouts import resize_vocab
from pretrain.convert.source import Source, open_init_source
from pretrain.data import TrainLoader, eval_batches, open_shards, read_options
from pretrain.errors import CheckpointError, UserError
from pretrain.metrics import MetricsLogger, Throughput, plot_losses
from pretrain.models import ModelFamily, ModelShape, count_parameters, get_family
from pretrain.models.init import copy_full_into_local, materialise
from pretrain.optim import EMA, Optimizers, lr_factor
from pretrain.step import Objective, forward_backward
from pretrain.validation import validation_metrics


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient: raised before the optimizer could apply it."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    corrupt_samples: int = 0
    """Samples delivered as valid=False (damaged shards), over all ranks, since the run began."""
    run_id: str = ""
    """The run's id for logging backends, kept in checkpoints: a resumed or requeued job continues
    the same wandb run (one job, one curve)."""
    skipped_steps: int = 0
    last_val: dict = field(default_factory=dict)


def resolve_model_shape(cfg: RunConfig, vocab_size: int, seq_len: int) -> RunConfig:
    """Fill model.vocab_size and model.seq_len from the shards, or check the ones given."""
    m = cfg.model
    if m.vocab_size is not None and m.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {vocab_size}; "
                        "set it to null (take it from the tokenizer) or at least that")
    if m.seq_len is not None and m.seq_len != seq_len:
        raise UserError(f"model.seq_len={m.seq_len} but the shards hold sequences of {seq_len}; set it to null "
                        "or re-shard with --seq-len")
    model = dataclasses.replace(m, vocab_size=m.vocab_size or vocab_size, seq_len=seq_len)
    return dataclasses.replace(cfg, model=model)


def resolve_label_classes(cfg: RunConfig) -> RunConfig:
    """Fill model.num_classes from the label set data.labels names (its labels.json, checked
    against the train split's shards), or check the one given; 0 without a label set. Runs before
    any process group: a missing or foreign label set stops the run here."""
    m = cfg.model
    if not hasattr(m, "num_classes"):
        return cfg  # a family without a label embedding (validate() refuses data.labels for it)
    if cfg.data.labels is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(m, num_classes=m.num_classes or 0))
    from pretrain.data import open_split
    from pretrain.data.labels import open_labels

    policy = read_options(cfg.data)["read_policy"]
    manifest, shards = open_split(cfg.data.shards, "train", policy=policy)
    classes = open_labels(cfg.data.shards, cfg.data.labels, "train", shards.counts, manifest.fingerprint,
                          policy).num_classes
    if m.num_classes is not None and m.num_classes != classes:
        raise UserError(f"model.num_classes={m.num_classes} but the label set data.labels={cfg.data.labels} has "
                        f"{classes} classes; set model.num_classes=null to take it from the label set")
    return dataclasses.replace(cfg, model=dataclasses.replace(m, num_classes=classes))


def starts_fresh(cfg: RunConfig) -> bool:
    """Whether a run of `cfg` starts from step 0 rather than resuming its own checkpoint (the folder
    holds none, or checkpoint.resume=none): only then does model.init_from apply."""
    if cfg.checkpoint.resume != "auto":
        return cfg.checkpoint.resume == "none"
    return not step_folders(Path(cfg.logging.run_dir) / "checkpoints")


def autocast_for(cfg: RunConfig, device: torch.device) -> torch.autocast | None:
    if cfg.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None


class PreemptionFlag:
    """SIGTERM/SIGUSR1 (Slurm preemption, scancel, --signal) and SIGINT (Ctrl-C) ask for a
    checkpoint and a clean exit (code 75: run the same command to resume).

    Only while training: `restore()` (in the loop's finally) gives the signals back their previous
    handlers, so that once the loop has ended, by an error too, `timeout`, `scancel` and torchrun
    stop the process as usual. A second SIGTERM or Ctrl-C while the first is pending ends it at
    once. A signal the process was started to ignore (SIGINT in a background job) stays ignored.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    AT_ONCE = (signal.SIGTERM, signal.SIGINT)  # a second one aborts the save
    SAME_EVENT_S = 2.0
    """A second signal this soon is the same event, not a second request: under srun + torchrun a
    worker gets Slurm's SIGTERM and, a moment later, the one torchrun forwards."""

    def __init__(self, stop_file: str | None = None):
        self.stop_file = Path(stop_file) if stop_file else None
        self.requested: signal.Signals | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        for sig in self.SIGNALS:
            try:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested, self._first_at = signal.Signals(signum), time.monotonic()
        elif signum in self.AT_ONCE and time.monotonic() - self._first_at >= self.SAME_EVENT_S:
            self.restore()
            signal.raise_signal(signum)  # the previous handler: terminate, or KeyboardInterrupt

    def describe(self) -> str:
        if self.requested is None:
            return f"stop file {self.stop_file}"
        return "interrupt (Ctrl-C)" if self.requested == signal.SIGINT else "preemption signal"

    def _asked(self) -> bool:
        return self.requested is not None or (self.stop_file is not None and self.stop_file.exists())

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled or sees the stop file (so all ranks save together)."""
        if not dist.is_initialized():
            return self._asked()
        flag = torch.tensor([int(self._asked())])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns the final validation metrics."""
    launch = detect_launch()
    validate(cfg, world_size=launch.world_size)  # before any process group starts
    check_machine(cfg)  # CUDA, the model's kernels, the run folder: before any process group too
    if cfg.data.labels is not None:  # the label set and its classes (sampling.label), before any process group too
        validate(resolve_label_classes(cfg), world_size=launch.world_size)
    if cfg.model.init_from and starts_fresh(cfg):
        manifest, tokenizer = open_shards(cfg.data.shards)
        shaped = resolve_model_shape(cfg, tokenizer.vocab_size, manifest.seq_len)
        open_init_source(resolve_label_classes(shaped))  # shapes, before too
    env = init_distributed(launch, cfg.train.device, cfg.parallel.timeout_s)
    try:
        result = trainer_class(cfg)(cfg, env).run()
        if dist.is_initialized():
            # Every rank is done before any tears its process group down: a rank destroying its
            # connections while a peer still finishes has aborted that peer at exit (seen under srun
            # after a preemption save). Only on success: after an error a peer may be gone.
            dist.barrier()
        return result
    finally:
        shutdown()


def trainer_class(cfg: RunConfig) -> type[Trainer]:
    """The training loop of the engine the config names (parallel.engine)."""
    if cfg.parallel.engine == "deepspeed":
        from pretrain.engines.deepspeed import DeepSpeedTrainer  # imports deepspeed: only when asked for

        return DeepSpeedTrainer
    return Trainer


def build_model_parts(family: ModelFamily, cfg: RunConfig, shape: ModelShape, layout: Layout, mesh,
                      device: torch.device) -> list[nn.Module]:
    """This rank's model, or its pipeline stages, parallelised and initialised: each part is built
    on the meta device (a stage holds only its own blocks), parallelised there (tp, activation
    checkpointing, compile, FSDP2), then only this rank's shards get storage on `device` and are
    initialised keyed by train.seed, so the weights are those of a one-process run on every layout."""
    if layout.pp == 1:
        parts = [family.build(cfg.model, shape, device="meta")]
    else:
        counts = cfg.parallel.layers_per_stage(cfg.model.num_layers)
        parts = [family.build_stage(cfg.model, shape, stage, counts)
                 for stage in stage_ids(layout, cfg.parallel.pp_virtual_stages)]
    return [materialise(family.parallelize(part, layout, mesh, cfg.parallel), device, cfg.train.seed)
            for part in parts]


@torch.no_grad()
def initialise_from(family: ModelFamily, cfg: RunConfig, shape: ModelShape, parts: list[nn.Module]) -> Source:
    """model.init_from's weights into this rank's model parts (built by build_model_parts); returns
    the source. Where the source can (a checkpoint, a consolidated file, a safetensors folder in
    either layout, the family's published one included) each rank reads only its shards' slices,
    or one parameter's tensors at a time; only a pytorch_model.bin folder is read whole first."""
    source = open_init_source(cfg)
    if source.load_into is not None:
        source.load_into({name: p for part in parts for name, p in part.named_parameters()}, shape.vocab_size)
    else:
        load_full_weights(parts, resize_vocab(family, source.load(), cfg.model.vocab_size, shape.vocab_size))
    return source


def load_full_weights(parts: list[nn.Module], weights: dict[str, torch.Tensor]) -> None:
    """Whole weights by parameter name (every parameter of `parts` among them) into the parts'
    parameters, plain or sharded: each takes its slice of the full tensor, which is then
    dropped from `weights`, so a rank holds the source and its shards, never a second full copy."""
    for part in parts:
        for name, param in part.named_parameters():
            copy_full_into_local(param, weights.pop(name).to(param.device))


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv):
        self.env = env
        self.run_dir = Path(cfg.logging.run_dir)
        self.manifest, self.tokenizer = open_shards(cfg.data.shards, read_options(cfg.data)["read_policy"])
        self.tokenizer_dir = self.tokenizer.folder  # the shard folder's copy (a local cache for a URL)
        self.cfg = cfg = resolve_label_classes(resolve_model_shape(cfg, self.tokenizer.vocab_size,
                                                                   self.manifest.seq_len))
        self.layout = Layout.of(cfg.parallel, env.rank, env.world_size)
        self.mesh = build_mesh(self.layout, env.device)
        self.dp_size, self.dp_rank = self.layout.dp, self.layout.dp_rank
        self.accum = grad_accum_steps(cfg, env.world_size)
        self.shape = ModelShape.of(cfg.model)
        self.family = get_family(cfg.model.family)
        self._setup_model()
        self.objective = Objective.build(cfg.diffusion, mask_id=self.tokenizer.mask_id,
                                         vocab_size=self.tokenizer.vocab_size, seed=cfg.train.seed,
                                         global_batch_size=cfg.data.global_batch_size,
                                         num_classes=getattr(cfg.model, "num_classes", None) or 0)
        self.autocast = autocast_for(cfg, env.device)
        self.loader = TrainLoader(cfg.data.shards, global_batch_size=cfg.data.global_batch_size,
                                  micro_batch_size=cfg.data.micro_batch_size, dp_rank=self.dp_rank,
                                  dp_size=self.dp_size, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                                  shuffle=cfg.data.shuffle, max_corrupt_fraction=cfg.data.max_corrupt_fraction,
                                  expected_tokenizer_sha256=self.tokenizer.sha256,
                                  verify_digests=cfg.data.verify_shards, labels=cfg.data.labels,
                                  **read_options(cfg.data))
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                         cfg.checkpoint.async_save, cfg.checkpoint.keep_every)
        self.state = TrainState()
        self.flops_per_step = self._flops_per_step()

    # -- set-up ---------------------------------------------------------------------------------

    def _setup_model(self) -> None:
        """The engine's room: the model parts parallelised (FSDP2/DDP, tp, pp), the runner that
        plays the step over them, their optimizers and the EMA. The DeepSpeed engine
        (pretrain/engines/deepspeed.py) replaces this and the optimizer step and checkpoints."""
        cfg = self.cfg
        # The initialisation draws from no global RNG (it is keyed); torch's is still seeded here, as
        # before, so that anything drawing from it later starts from the run's seed.
        torch.manual_seed(cfg.train.seed)
        self.parts = build_model_parts(self.family, cfg, self.shape, self.layout, self.mesh, self.env.device)
        if cfg.model.init_from and starts_fresh(cfg):
            self._initialise_from(self.parts)
        self.runner = PipelineRunner(self.parts, self.layout, self.mesh, cfg.parallel, self.env.device) \
            if self.layout.pp > 1 else LocalRunner(self.parts[0])
        self.optimizers = Optimizers(self.parts, cfg.optim)
        self.ema = EMA(self.parts, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None

    @torch.no_grad()
    def _initialise_from(self, parts: list[nn.Module]) -> None:
        """model.init_from's weights into this rank's (parallelised) model parts, each rank keeping
        only its shards; the optimizer, the EMA (a copy of these weights), the step and the data
        position start fresh."""
        source = initialise_from(self.family, self.cfg, self.shape, parts)
        self._log_main(f"initialised from the {source.kind} {source.path}")

    def _parameters(self):
        return [p for part in self.parts for p in part.parameters()]

    def _flops_per_step(self) -> int:
        forward = self.family.forward_flops(self.cfg.model, self.shape) * self.cfg.data.global_batch_size
        if not self.cfg.diffusion.corrector_training:
            return 3 * forward
        return (7 if self.cfg.train.step_mode == "two_pass" else 6) * forward

    def _resume(self) -> None:
        self.checkpointer.remove_incomplete()
        choice = self.cfg.checkpoint.resume
        folder = self.checkpointer.folder
        if choice == "none":
            if latest_checkpoint(folder) is not None:
                raise UserError(f"{folder} already holds checkpoints and checkpoint.resume=none; use "
                                "checkpoint.resume=auto to continue, or a new logging.run_dir")
            return
        # Checked on every rank together (digests split between them): all ranks load the same one.
        path, skipped = self.checkpointer.resume_point(choice, self.cfg.checkpoint.verify)
        for damaged, problem in skipped:
            self._log_main(f"skipping damaged checkpoint {damaged}: {problem}")
        if path is None:
            return
        if IMPORTED_KEY in read_meta(path):
            raise CheckpointError(f"{path} was made by `proseco convert import` and holds weights only (no optimizer "
                                  f"state or data position); start a new run from it with model.init_from={path}")
        self._restore_progress(path, self._load_checkpoint(path))

    def _load_checkpoint(self, path: Path) -> dict:
        """The tensors of the (verified) checkpoint at `path` into the model parts, their optimizers
        and the EMA; returns its meta.json. The DeepSpeed engine loads its own and DCP ones."""
        if is_deepspeed_checkpoint(path):
            raise CheckpointError(f"{path} was saved by the DeepSpeed engine: resume it with "
                                  "parallel.engine=deepspeed, or convert it for this engine: "
                                  f"`proseco checkpoint convert {path} --out NEW_RUN_DIR`")
        state = app_state(self.parts, self.optimizers.optimizers, self.ema.shadow if self.ema else None)
        refuse_resume_if_renamed(path, list(state["model"]), lambda s: self.family.upgrade_state(s, self.cfg.model))
        try:
            meta = self.checkpointer.load(path, state, verify=None)  # verified just now
        except (RuntimeError, ValueError) as err:
            if isinstance(err, UserError):
                raise
            raise CheckpointError(f"cannot load {path} into this model ({str(err).splitlines()[0]}); was it saved "
                                  "with another model config?") from None
        load_app_state(self.parts, self.optimizers.optimizers, state)
        self.optimizers.reapply_config()
        if self.ema is not None:
            if "ema" in state:
                self.ema.num_updates = int(meta["ema_num_updates"])
            else:
                self.ema = EMA(self.parts, self.cfg.optim.ema_decay)
        return meta

    def _restore_progress(self, path: Path, meta: dict) -> None:
        """The data position, counters and run id of a loaded checkpoint (either engine's)."""
        self.loader.load_state_dict(meta["data"])
        self.state = TrainState(step=meta["step"], tokens_seen=meta["tokens_seen"], last_val=meta.get("val", {}),
                                corrupt_samples=meta.get("corrupt_samples", 0), run_id=meta.get("run_id", ""))
        self._log_main(f"resumed from {path} at step {self.state.step}")

    def _meta(self) -> dict:
        """What a checkpoint's meta.json holds besides the tensors (the same for either engine)."""
        return {"data": self.loader.state_dict(), "tokens_seen": self.state.tokens_seen,
                "corrupt_samples": self.state.corrupt_samples, "run_id": self.state.run_id, "config": to_dict(self.cfg),
                "has_ema": self.ema is not None, "ema_num_updates": self.ema.num_updates if self.ema else 0,
                "val": self.state.last_val, "world_size": self.env.world_size}

    def _save(self) -> Path:
        state = app_state(self.parts, self.optimizers.optimizers, self.ema.shadow if self.ema else None)
        return self.checkpointer.save(self.state.step, state, self._meta(), {"tokenizer": self.tokenizer_dir})

    def _log_main(self, message: str) -> None:
        if not self.env.is_main:
            return
        logger = getattr(self, "logger", None)
        logger.print(message) if logger is not None else print(message, flush=True)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        if self.env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self._resume()
        self.state.run_id = self.state.run_id or uuid.uuid4().hex[:12]  # rank 0's is the one saved
        tokens_per_step = cfg.data.global_batch_size * self.shape.seq_len
        self.logger = MetricsLogger(cfg, self.run_dir, self.env.is_main, cfg.train.max_steps, self.state.step,
                                    tokens_per_step, run_id=self.state.run_id)
        meta_model = self.family.build(cfg.model, self.shape, device="meta")
        self._log_main(f"model: {count_parameters(meta_model):,} parameters, vocab "
                       f"{self.tokenizer.vocab_size} ({self.shape.vocab_size} rows), seq_len {self.shape.seq_len}; "
                       f"{self.layout.describe()}, {self.accum} micro-batches of {cfg.data.micro_batch_size} per rank; "
                       f"step mode {cfg.train.step_mode}; "
                       f"{cfg.model.kernels(self.env.device.type, cfg.train.precision)}")
        preemption = PreemptionFlag(cfg.train.stop_file)
        batches = iter(self.loader)
        throughput = Throughput()
        try:
            while self.state.step < cfg.train.max_steps:
                record = self._train_step([next(batches) for _ in range(self.accum)])
                self.state.step += 1
                self.state.tokens_seen += tokens_per_step
                throughput.add(tokens_per_step)
                self.checkpointer.poll()
                step = self.state.step
                if step % cfg.logging.log_every == 0 or step == cfg.train.max_steps:
                    tps = throughput.rate()
                    record.update(step=step, split="train", tokens_seen=self.state.tokens_seen, tokens_per_s=tps,
                                  tflops_per_s=tps / tokens_per_step * self.flops_per_step / 1e12)
                    self.logger.log(record)
                self.logger.progress(step, record["loss"])
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                    self._validate()
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    self._save()
                if preemption.agreed():
                    self._log_main(f"{preemption.describe()}: saving step {step} and exiting; run the same "
                                   "command to resume")
                    self._save()
                    self.checkpointer.wait()
                    return {"preempted": True, "step": step}
            final = self._validate()
            self._save()
            self.checkpointer.wait()
            if self.env.is_main:
                plot_losses(self.run_dir, cfg.diffusion)
            return final
        finally:
            # Stop the DataLoader workers now, on an error too: left to interpreter exit, they
            # (which ignore SIGTERM, see pretrain/data/loader.py) are joined forever.
            batches.close()
            preemption.restore()
            self.logger.close()

    def _train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; returns its metrics."""
        cfg, step = self.cfg, self.state.step
        self.optimizers.set_lr(cfg.optim.lr * lr_factor(step, cfg.optim, cfg.train.max_steps))
        record = self.forward_backward(micro_batches)
        self.state.corrupt_samples += record.pop("corrupt_samples")
        record["corrupt_samples"] = self.state.corrupt_samples
        grad_norm = self._clip_gradients()
        record.update(grad_norm=grad_norm, lr=self.optimizers.lr)
        if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
            self._handle_nonfinite(step, record)
            return record
        self.state.skipped_steps = 0
        self.optimizers.step()
        self.optimizers.zero_grad()
        if self.ema is not None:
            self.ema.update()
        return record

    def forward_backward(self, micro_batches: list[dict]) -> dict[str, float]:
        """Gradients of the step's loss, accumulated over this rank's micro-batches and reduced
        over data-parallel ranks. Returns the global loss, MDLM and corrector terms and error
        rates, each per token of the global batch."""
        cfg, device, step = self.cfg, self.env.device, self.state.step
        for part in self.parts:
            part.train()
        # Dropout: the same mask on tensor-parallel ranks holding replicated activations, different
        # masks where they hold different slices (sequence parallelism) or different data.
        sp_rank = self.layout.tp_rank if cfg.parallel.sequence_parallel else 0
        seed_dropout(cfg.train.seed, step, self.layout.dp_rank * self.layout.tp + sp_rank)
        batches = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in micro_batches]
        # Normalise by the token count of the whole global batch (all ranks, all micro-batches), so
        # the loss does not depend on how the batch is split (the official reduction, made global).
        # One reduction for the token count and the damaged samples (valid=False) of the step.
        counts = self._all_reduce(torch.stack([sum(b["valid"].sum() for b in batches).float() * self.shape.seq_len,
                                               sum((~b["valid"]).sum() for b in batches).float()]))
        n_tokens, corrupt = counts[0].clamp(min=1.0), int(counts[1])
        # Data parallelism averages gradients over dp ranks; x dp makes them global sums.
        scale = self.dp_size / n_tokens
        sums = forward_backward(self.runner, batches, self.objective, step, cfg.train.step_mode, scale,
                                self.autocast)
        for part in self.parts:
            reduce_partial_gradients(part)
        return {**sums.reduced(self._all_reduce).per_token(n_tokens), "corrupt_samples": corrupt}

    def _clip_gradients(self) -> float:
        pp_group = self.mesh["pp"].get_group() if self.layout.pp > 1 else None
        return clip_gradients(self._parameters(), self.cfg.optim.grad_clip, pp_group)

    def _handle_nonfinite(self, step: int, record: dict) -> None:
        what = "loss" if not math.isfinite(record["loss"]) else "gradient norm"
        self._discard_gradients()
        message = (f"non-finite {what} at step {step} (loss={record['loss']}, grad_norm={record['grad_norm']}); "
                   "the update was not applied")
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(message + "; the last checkpoint is intact. Lower optim.lr, check the data, or set "
                                 "train.on_nonfinite=skip")
        self.state.skipped_steps += 1
        self._log_main(message + f" (skipped {self.state.skipped_steps} in a row)")
        if self.state.skipped_steps >= self.cfg.train.max_skipped_steps:
            raise NonFiniteError(f"{self.state.skipped_steps} consecutive non-finite steps up to step {step}; "
                                 "stopping (train.max_skipped_steps)")

    def _discard_gradients(self) -> None:
        self.optimizers.zero_grad()

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (tensor/pipeline ranks hold the same numbers)."""
        if self.dp_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, group=dp_group(self.mesh))
        return tensor

    def _validate(self) -> dict:
        started = time.perf_counter()
        batches = eval_batches(self.cfg.data.shards, "val", micro_batch_size=self.cfg.data.micro_batch_size,
                               dp_rank=self.dp_rank, dp_size=self.dp_size,
                               max_samples=self.cfg.train.eval_batches * self.cfg.data.global_batch_size or None,
                               verify_digests=self.cfg.data.verify_shards, labels=self.cfg.data.labels,
                               **read_options(self.cfg.data))
        metrics = validation_metrics(self.runner, self.ema, batches, self.objective, self.state.step,
                                     self.env.device, self._all_reduce, self.autocast)
        metrics.update(step=self.state.step, split="val", seconds=time.perf_counter() - started)
        self.state.last_val = metrics
        self.logger.log(metrics)
        self._log_main(f"step {self.state.step}: val MDLM NELBO {metrics['mdlm_nelbo']:.4f} "
                       f"(perplexity <= {metrics['perplexity_bound']:.2f}), corrector loss "
                       f"{metrics['corrector_nll']:.4f}, corrector output error "
                       f"{metrics['corrector_output_error']:.3f}")
        return metrics
