"""The DeepSpeed engine's training loop: `parallel.engine=deepspeed`.

The native loop (pretrain/train.py) with four rooms replaced: the model goes into a DeepSpeed
ZeRO engine instead of FSDP2 (activation checkpointing still from the family's plan), the step
runs through `DeepSpeedRunner` (same `forward_backward`, both step modes, same loss scaling),
the optimizer step is the engine's (clipping inside it, our learning-rate schedule set before it,
its update withheld on a step with a non-finite loss or gradient), and checkpoints hold
DeepSpeed's own files in the same atomic, verified, rotating folder with the same meta.json
(data position, counters, EMA count).

Resume takes the run's own DeepSpeed checkpoints (same world size and ZeRO stage) or a native
DCP checkpoint at any layout (whole weights, AdamW moments and EMA set into the engine), so a
run moves from the native engine to this one; `proseco checkpoint convert` goes the other way.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from parallel.deepspeed_engine import (
    DeepSpeedRunner,
    GradientWatch,
    HeldEMA,
    RunSettings,
    bf16_enabled,
    build_engine,
    engine_config,
    read_deepspeed_json,
    set_full_state,
    set_lr,
    start_comm,
    withheld_update,
    zero_stage,
)
from parallel.env import backend_for
from parallel.mesh import Layout
from pretrain.checkpoint import dcp_load, read_meta
from pretrain.checkpoint.folder import DEEPSPEED_DIR, is_deepspeed_checkpoint
from pretrain.checkpoint.inference import refuse_resume_if_renamed
from pretrain.errors import CheckpointError, UserError
from pretrain.optim import lr_factor
from pretrain.train import Trainer, starts_fresh

EMA_DIR = "ema"
ENGINE_KEY = "engine"


def ema_file(stage: int, rank: int) -> str:
    """Where a rank's EMA goes: one file of whole tensors (ZeRO-1/2: every rank holds the same), or
    one file of partitions per rank (ZeRO-3)."""
    return f"{EMA_DIR}/rank_{rank:05d}.safetensors" if stage == 3 else f"{EMA_DIR}/whole.safetensors"


class DeepSpeedTrainer(Trainer):
    """Trainer whose model, optimizer step and checkpoint tensors belong to a DeepSpeed engine."""

    def _setup_model(self) -> None:
        cfg = self.cfg
        start_comm(backend_for(self.env.device), cfg.parallel.timeout_s, self.env.local_rank)
        json_cfg = read_deepspeed_json(cfg.parallel.deepspeed_config)
        self.zero_stage = zero_stage(json_cfg)
        # The family's plan on a one-process layout applies what is left of it: activation checkpointing.
        alone = Layout(dp=1, tp=1, pp=1, dp_rank=0, tp_rank=0, pp_rank=0, replicate=True)
        # Built on the meta device and materialised whole (keyed by train.seed): ZeRO partitions a
        # whole model, which every rank holds until the engine starts.
        torch.manual_seed(cfg.train.seed)  # as Trainer._setup_model
        model = self.family.parallelize(self.family.build(cfg.model, self.shape, self.env.device, cfg.train.seed),
                                        alone, None, cfg.parallel)
        if cfg.model.init_from and starts_fresh(cfg):
            self._initialise_from([model])
        o = cfg.optim
        run = RunSettings(micro_batch_size=cfg.data.micro_batch_size, accumulation=self.accum, dp=self.dp_size,
                          lr=o.lr * lr_factor(0, o, cfg.train.max_steps), betas=tuple(o.betas), eps=o.eps,
                          weight_decay=o.weight_decay, grad_clip=o.grad_clip)
        self.engine = build_engine(model, engine_config(json_cfg, run))
        self.parts = [self.engine.module]
        self.runner = DeepSpeedRunner(self.engine)
        self.grad_watch = GradientWatch(self.engine.module)
        self.optimizers = None  # the engine's
        self.ema = HeldEMA(self.engine.module, o.ema_decay) if o.ema_decay > 0 else None
        self.lr = run.lr
        self._log_main(f"DeepSpeed ZeRO-{self.zero_stage} from {cfg.parallel.deepspeed_config}"
                       f"{', bf16' if bf16_enabled(json_cfg) else ''}")

    # -- the step -------------------------------------------------------------------------------

    def _train_step(self, micro_batches: list[dict]) -> dict:
        cfg, step = self.cfg, self.state.step
        self.lr = cfg.optim.lr * lr_factor(step, cfg.optim, cfg.train.max_steps)
        set_lr(self.engine, self.lr)
        record = self.forward_backward(micro_batches)
        self.state.corrupt_samples += record.pop("corrupt_samples")
        record["corrupt_samples"] = self.state.corrupt_samples
        # Decided before the engine steps, on every rank alike: the loss is already summed over
        # ranks, the gradient check is reduced here. DeepSpeed itself would apply a NaN loss's
        # finite gradients, and whether it skips a non-finite gradient depends on its version,
        # precision and ZeRO stage; so a bad step runs with the optimizer's update withheld.
        bad_grads = float(self._all_reduce(self.grad_watch.take(self.env.device)).item()) > 0
        apply = math.isfinite(record["loss"]) and not bad_grads
        if apply:
            self.engine.step()  # clipping (optim.grad_clip) and AdamW inside
        else:
            with withheld_update(self.engine):
                self.engine.step()
        norm = self.engine.get_global_grad_norm()
        record.update(grad_norm=float(norm) if norm is not None else math.nan, lr=self.lr)
        finite = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        # was_step_applied: DeepSpeed's own skip (a norm that overflowed from finite gradients).
        if not (apply and finite and self.engine.was_step_applied()):
            self._handle_nonfinite(step, record)
            return record
        self.state.skipped_steps = 0
        if self.ema is not None:
            self.ema.update()
        return record

    def _discard_gradients(self) -> None:
        self.engine.optimizer.zero_grad()  # DeepSpeed cleared them already on a skipped step

    # -- checkpoints ----------------------------------------------------------------------------

    def _save(self) -> Path:
        meta = {**self._meta(), ENGINE_KEY: "deepspeed", "zero_stage": self.zero_stage}

        def write(folder: Path) -> None:
            # universal_checkpoint_info: lets DeepSpeed's ds_to_universal convert ZeRO-1/2 checkpoints too.
            self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_DIR, save_latest=False,
                                        client_state={"universal_checkpoint_info": {}})
            if self.ema is not None and (self.zero_stage == 3 or self.env.rank == 0):
                out = folder / ema_file(self.zero_stage, self.env.rank)
                out.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in self.ema.shadow.items()}, str(out))

        return self.checkpointer.save_with(self.state.step, write, meta, {"tokenizer": self.tokenizer_dir})

    def _load_checkpoint(self, path: Path) -> dict:
        meta = read_meta(path)
        if is_deepspeed_checkpoint(path):
            self._load_deepspeed(path, meta)
        else:
            self._load_native(path, meta)
        return meta

    def _load_deepspeed(self, path: Path, meta: dict) -> None:
        saved = (meta.get("world_size"), meta.get("zero_stage"))
        if saved != (self.env.world_size, self.zero_stage):
            raise UserError(f"{path} was saved by DeepSpeed ZeRO-{saved[1]} on {saved[0]} processes; this run is "
                            f"ZeRO-{self.zero_stage} on {self.env.world_size}. Convert it first: `proseco checkpoint "
                            f"convert {path} --out NEW_RUN_DIR`, then resume from NEW_RUN_DIR's checkpoint with "
                            "checkpoint.resume=PATH (either engine, any number of processes)")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_DIR, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {path / DEEPSPEED_DIR}")
        if self.ema is not None:
            file = path / ema_file(self.zero_stage, self.env.rank)
            if meta.get("has_ema", False) and file.is_file():
                saved_ema = load_file(str(file))
                for name, tensor in self.ema.shadow.items():
                    tensor.copy_(saved_ema[name])
                self.ema.num_updates = int(meta["ema_num_updates"])
            else:
                self.ema = HeldEMA(self.engine.module, self.cfg.optim.ema_decay)

    def _load_native(self, path: Path, meta: dict) -> None:
        """A DCP checkpoint (the native engine's, any layout): every rank reads the whole state and
        sets its share of it into the engine."""
        shapes = {name: p.ds_shape if hasattr(p, "ds_shape") else p.shape
                  for name, p in self.engine.module.named_parameters()}
        refuse_resume_if_renamed(path, list(shapes), lambda s: self.family.upgrade_state(s, self.cfg.model))
        weights = {name: torch.empty(shape) for name, shape in shapes.items()}
        moments = {name: {"exp_avg": torch.empty(shape), "exp_avg_sq": torch.empty(shape)}
                   for name, shape in shapes.items()}
        optim = {f"state.{name}.{key}": t for name, pair in moments.items() for key, t in pair.items()}
        first = next(iter(shapes))
        optim[f"state.{first}.step"] = torch.zeros(())
        state = {"model": weights, "optim": optim}
        with_ema = self.ema is not None and meta.get("has_ema", False)
        if with_ema:
            state["ema"] = {name: torch.empty(shape) for name, shape in shapes.items()}
        try:
            dcp_load(state, path, no_dist=True)
        except CheckpointError as err:
            raise CheckpointError(f"cannot resume the DeepSpeed engine from {path}: {err}") from None
        set_full_state(self.engine, weights, moments, int(optim[f"state.{first}.step"].item()))
        if self.ema is not None:
            if with_ema:
                self.ema.load_whole(state["ema"], dist.get_rank() if dist.is_initialized() else 0,
                                    self.env.world_size)
                self.ema.num_updates = int(meta["ema_num_updates"])
            else:
                self.ema = HeldEMA(self.engine.module, self.cfg.optim.ema_decay)
