"""DeepSpeed ZeRO as a second data-parallel engine, beside FSDP2/DDP (data_parallel.py).

The application keeps its model, objective, data and metrics; this module gives it what differs:
the engine's JSON (checked before any process group, completed from the run's own settings), the
engine itself, a runner with the pipeline runner's interface (runner.py) that routes forward and
backward through the engine, an EMA of what each rank holds of the weights, the learning rate
put into the engine's optimizer, and the engine's full weights and Adam moments set from outside
(to resume from another engine's checkpoint).

Who owns what, so nothing is set twice: the run config owns batch sizes, gradient accumulation
(the runner marks the last micro-batch of a step as DeepSpeed's accumulation boundary), AdamW's
hyper-parameters (DeepSpeed builds torch's AdamW: "torch_adam"), clipping (DeepSpeed applies it,
with the norm over its partitioned gradients, from optim.grad_clip) and the learning-rate
schedule (set every step; no DeepSpeed scheduler). The JSON owns ZeRO (stage, CPU offload of the
optimizer state, buckets) and bf16. Keys it must not hold are refused with the field to use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from parallel.pipeline import LossFn

OWNED_ELSEWHERE = {
    "train_batch_size": "data.global_batch_size",
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "data.global_batch_size / (dp x data.micro_batch_size)",
    "optimizer": "optim.lr, optim.betas, optim.eps, optim.weight_decay",
    "scheduler": "optim.warmup_steps, optim.schedule, optim.min_lr_ratio",
    "gradient_clipping": "optim.grad_clip",
    "fp16": "bf16 in this JSON (fp16 loss scaling is not supported)",
}


def read_deepspeed_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def deepspeed_json_problems(path: str | Path) -> list[str]:
    """Why the DeepSpeed JSON at `path` cannot configure a run (empty: it can); no DeepSpeed import."""
    where = f"parallel.deepspeed_config={path}"
    try:
        cfg = read_deepspeed_json(path)
    except OSError as err:
        return [f"{where} cannot be read ({err.strerror or err}); give a JSON such as configs/deepspeed/zero2.json"]
    except ValueError as err:
        return [f"{where} is not valid JSON ({err})"]
    if not isinstance(cfg, dict):
        return [f"{where} must hold a JSON object"]
    found = [f"{where} sets {key!r}, which this run config owns: remove it and set {owner}"
             for key, owner in OWNED_ELSEWHERE.items() if key in cfg]
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (1, 2, 3):
        found.append(f"{where}: zero_optimization.stage must be 1, 2 or 3, got {stage!r}")
    bf16 = cfg.get("bf16", {})
    if not isinstance(bf16, dict):
        found.append(f"{where}: bf16 must be an object such as {{\"enabled\": true}}")
    return found


def zero_stage(cfg: dict) -> int:
    return int(cfg["zero_optimization"]["stage"])


def bf16_enabled(cfg: dict) -> bool:
    return bool(cfg.get("bf16", {}).get("enabled", False))


@dataclass(frozen=True)
class RunSettings:
    """What the run config decides for the engine (see the module docstring)."""

    micro_batch_size: int
    """Sequences per forward on one rank."""
    accumulation: int
    """Micro-batches per rank per optimizer step."""
    dp: int
    """Data-parallel ranks (the world size: the engine is data-parallel only)."""
    lr: float
    """The learning rate before the first step (the schedule sets it every step after)."""
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float
    """Global gradient-norm clip (0: none)."""


def engine_config(json_cfg: dict, run: RunSettings) -> dict:
    """The full DeepSpeed config: the JSON's ZeRO and bf16 sections plus the run's settings."""
    cfg = {**json_cfg}
    cfg.update(
        train_micro_batch_size_per_gpu=run.micro_batch_size,
        gradient_accumulation_steps=run.accumulation,
        train_batch_size=run.micro_batch_size * run.accumulation * run.dp,
        gradient_clipping=run.grad_clip,
        # torch's AdamW (torch_adam): DeepSpeed's fused CPU/GPU Adam would need a compiled op.
        optimizer={"type": "AdamW", "params": {"lr": run.lr, "betas": list(run.betas), "eps": run.eps,
                                               "weight_decay": run.weight_decay, "torch_adam": True}},
        steps_per_print=cfg.get("steps_per_print", 2**31 - 1),  # the run logs its own progress
    )
    if bf16_enabled(cfg):
        # DeepSpeed's own overflow check (as in fp32); the trainer withholds such a step anyway.
        cfg["bf16"] = {**cfg["bf16"], "check_grad_overflow": True}
    return cfg


def start_comm(backend: str, timeout_s: float, local_rank: int) -> None:
    """Hand the process group the application started (one of a single process, if none) to
    DeepSpeed's communication layer, which builds nothing new then; on CPU its first call compiles
    a shared-memory op once, cached in TORCH_EXTENSIONS_DIR."""
    import datetime
    import os

    import deepspeed
    import torch.distributed as dist

    # DeepSpeed's engine insists on LOCAL_RANK, which srun (SLURM_LOCALID) and one process do not set.
    os.environ.setdefault("LOCAL_RANK", str(local_rank))

    if not dist.is_initialized():
        # One process: DeepSpeed still wants a process group (and would look for MPI to make one).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def build_engine(model: nn.Module, cfg: dict):
    """The DeepSpeed engine around `model` (weights as built: identical on every rank)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def init_adamw_state(adamw: torch.optim.Optimizer, flat: torch.Tensor) -> None:
    """The state torch's AdamW gives a parameter at its first step (a no-op once it has one)."""
    if not adamw.state.get(flat):
        adamw.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                             "exp_avg_sq": torch.zeros_like(flat)}


class GradientWatch:
    """Whether any gradient this rank computed in the step's backward passes was NaN/Inf.

    A hook on every parameter sees each micro-batch's local gradient before DeepSpeed takes it
    (reduces, partitions, frees it), so the check does not depend on where the ZeRO stage keeps
    the reduced gradient. A reduced gradient is non-finite iff a local one was (or a sum
    overflowed, which DeepSpeed's own norm check then reports). The flag stays on the device:
    no synchronisation per gradient; the trainer reduces it over ranks once per step.
    """

    def __init__(self, module: nn.Module):
        self.bad = None
        self.handles = [p.register_hook(self._check) for p in module.parameters() if p.requires_grad]

    def _check(self, grad: torch.Tensor) -> None:
        bad = ~torch.isfinite(grad).all()
        self.bad = bad if self.bad is None else self.bad | bad

    def take(self, device: torch.device) -> torch.Tensor:
        """1.0 if a non-finite gradient was seen since the last call, else 0.0 (and reset)."""
        bad, self.bad = self.bad, None
        return torch.zeros((), device=device) if bad is None else bad.float().to(device)


class withheld_update:
    """`with withheld_update(engine): engine.step()`: DeepSpeed's step with the wrapped torch
    optimizer's step() a no-op, so no weight, moment or step count changes.

    Why not simply skip engine.step() on a step that must not be applied: the step is what makes
    DeepSpeed consume the step's reduced gradients (free them, reset its ZeRO buffers and its
    micro-step count), so without it the next step would add onto them. Only the torch
    optimizer's step moves the fp32 master weights (DeepSpeed then copies them, unchanged, back
    into the weights forward uses), so withholding it leaves every tensor as before the step.
    Before the first applied step the parameter gets the state AdamW would create (zeros, step
    0): ZeRO-1/2 link their per-parameter views of the optimizer state once, after the first
    step, and must find it there.
    """

    def __init__(self, engine):
        adamws = [engine.optimizer.optimizer, getattr(engine.optimizer, "backup_optimizer", None)]
        self.adamws = [a for a in adamws if a is not None]

    def __enter__(self) -> None:
        for adamw in self.adamws:
            adamw.step = self._no_step(adamw)  # the instance attribute hides the class's step

    def __exit__(self, *exc) -> None:
        for adamw in self.adamws:
            del adamw.step

    @staticmethod
    def _no_step(adamw: torch.optim.Optimizer):
        def step(closure=None) -> None:
            for group in adamw.param_groups:
                for flat in group["params"]:
                    init_adamw_state(adamw, flat)
        return step


class DeepSpeedRunner:
    """The model inside a DeepSpeed engine, behind the pipeline runner's interface (as LocalRunner).

    Forward and backward go through the engine, so its hooks gather ZeRO-3 partitions and reduce
    gradients; the loss is backpropagated as the step scaled it (no division by the accumulation
    steps: the step normalises by the global token count itself). The last micro-batch of a step
    is DeepSpeed's accumulation boundary, where it reduces the gradients of the step.
    """

    holds_whole_model = True
    is_first = is_last = True

    def __init__(self, engine):
        self.engine = engine
        self.parts = [engine.module]

    def forward(self, *inputs: torch.Tensor):
        return self.engine(*inputs)

    def run(self, inputs: tuple[torch.Tensor, ...], microbatches: int, rows: int, loss_fn: LossFn,
            training: bool) -> None:
        for m in range(microbatches):
            chunk = tuple(x[m * rows:(m + 1) * rows] for x in inputs)
            if not training:
                with torch.no_grad():
                    loss_fn(self.engine(*chunk), m)
                continue
            self.engine.set_gradient_accumulation_boundary(m == microbatches - 1)
            self.engine.backward(loss_fn(self.engine(*chunk), m), scale_wrt_gas=False)

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def held(p: nn.Parameter) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, or (ZeRO-1/2) the whole of it."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class HeldEMA:
    """EMA of the weights each rank holds (whole under ZeRO-1/2, its partition under ZeRO-3), in
    fp32 whatever the engine's dtype, with the native EMA's warm-up min(decay, (1+n)/(10+n)).

    `swap()` puts the EMA into the engine's weights (the engine's own fp32 master copy stays
    untouched) and, called again, the weights back, bit for bit, as the native EMA's does.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.num_updates = 0
        self.shadow = {name: held(p).detach().float().clone() for name, p in module.named_parameters()}
        self._saved: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, p in self.module.named_parameters():
            self.shadow[name].lerp_(held(p).float(), 1 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        params = dict(self.module.named_parameters())
        if self._saved is None:
            self._saved = {name: held(p).clone() for name, p in params.items()}
            for name, p in params.items():
                held(p).copy_(self.shadow[name])
        else:
            for name, p in params.items():
                held(p).copy_(self._saved[name])
            self._saved = None


    @torch.no_grad()
    def load_whole(self, whole: dict[str, torch.Tensor], rank: int, world_size: int) -> None:
        """Set the EMA from whole tensors (another engine's or world size's checkpoint): a ZeRO-3
        rank keeps its partition of each."""
        for name, p in self.module.named_parameters():
            copy_held(p, self.shadow[name], whole[name], rank, world_size)


@torch.no_grad()
def copy_held(p: nn.Parameter, target: torch.Tensor, whole: torch.Tensor, rank: int, world_size: int) -> None:
    """Copy into `target` (shaped like held(p)) what rank `rank` holds of the whole tensor `whole`."""
    if hasattr(p, "ds_tensor"):
        start, end = partition_bounds(p.ds_numel, world_size, rank)
        target.zero_()
        target.view(-1)[:end - start].copy_(whole.reshape(-1)[start:end])
    else:
        target.copy_(whole)


def whole_from_partitions(partitions: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """A parameter from its ZeRO-3 partitions in rank order (padding past its size dropped)."""
    numel = math.prod(shape)
    return torch.cat([t.reshape(-1) for t in partitions])[:numel].reshape(shape)


def partition_bounds(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """The slice [start, end) of a flattened parameter that ZeRO-3 rank `rank` holds (each rank
    holds ceil(numel / world_size) elements, the last ones padding past `numel`)."""
    size = -(-numel // world_size)
    return min(rank * size, numel), min((rank + 1) * size, numel)


@torch.no_grad()
def set_full_state(engine, weights: dict[str, torch.Tensor], moments: dict[str, dict[str, torch.Tensor]],
                   step: int) -> None:
    """Put whole fp32 weights and AdamW moments (name -> {"exp_avg", "exp_avg_sq"}) into the engine,
    on any ZeRO stage and world size, and the optimizer's step count: what another engine's or
    another world size's checkpoint holds."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    adamw = engine.optimizer.optimizer  # torch's AdamW over DeepSpeed's flat fp32 partitions
    # ZeRO-3 puts its partitions into AdamW's groups only while it steps; ZeRO-1/2 keep them there.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        flat for group in adamw.param_groups for flat in group["params"]]
    for flat in flats:
        init_adamw_state(adamw, flat)  # before the first step: the state AdamW itself would create
    rank, world_size = engine.global_rank, engine.world_size
    for name, p in engine.module.named_parameters():
        safe_set_full_fp32_param(p, weights[name].float())  # the optimizer's fp32 master copy
        copy_held(p, held(p), weights[name], rank, world_size)  # and the weights forward uses
        for key, value in moments.get(name, {}).items():
            safe_set_full_optimizer_state(p, value.float(), key)
    # torch's AdamW keeps one step count per (flattened) parameter it updates.
    for state in adamw.state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(step)) if torch.is_tensor(state["step"]) else step
