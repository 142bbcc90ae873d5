"""Run under torchrun by benchmarks/comm.py: bytes each collective moves in one training step.

Every collective of PyTorch (DTensor's functional collectives, FSDP2's all-gathers and
reduce-scatters, plain torch.distributed calls) passes through a c10d dispatcher op; a
TorchDispatchMode sees them all and records the payload of each: the bytes of the full result
for all-gathers, of the input for reductions.

    torchrun --nproc_per_node N benchmarks/comm_worker.py SHARDS OUT.json LAYOUT...
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d
from torch.distributed.fsdp import FSDPModule
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.env import detect_launch, init_distributed
from pretrain.config import load_config
from pretrain.train import Trainer

MODEL = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.cond_dim=64", "data.global_batch_size=8",
         "data.micro_batch_size=2", "data.num_workers=0", "logging.progress=false", "optim.warmup_steps=0"]


def _bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


def _kind(name: str) -> str | None:
    """all_reduce / all_gather / reduce_scatter / other for a c10d op name, None if not a collective."""
    if "c10d" not in name:
        return None
    for kind in ("reduce_scatter", "all_reduce", "allreduce", "all_gather", "allgather", "broadcast", "all_to_all"):
        if kind in name:
            return {"allreduce": "all_reduce", "allgather": "all_gather"}.get(kind, kind)
    return None


def _group_size(func, args) -> int:
    """Ranks taking part in a collective (1: a no-op, e.g. FSDP2's replicate group of size one)."""
    for arg in reversed(args):  # the group comes last (functional ops: after the reduce op's name)
        if isinstance(arg, str):  # functional collectives name their group
            return distributed_c10d._resolve_process_group(arg).size()
        if isinstance(arg, torch.ScriptObject) and arg._type().name().endswith("ProcessGroup"):
            return dist.ProcessGroup.unbox(arg).size()
    raise RuntimeError(f"no process group among the arguments of {func}")


class CountCollectives(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _kind(str(func))
        out = func(*args, **kwargs)
        if kind is not None and _group_size(func, args) > 1:
            # Reductions: the tensor reduced; gathers: the gathered result. The in-place c10d
            # reduce-scatters take (output, input): their input is the second argument.
            if kind == "all_gather":
                payload = _bytes(out)
            elif kind == "reduce_scatter" and str(func).startswith("c10d."):
                payload = _bytes(args[1])
            else:
                payload = _bytes(args[0])
            self.bytes[kind] += payload
            self.calls[kind] += 1
        return out


def analytic(trainer: Trainer, mode: str) -> dict[str, int]:
    """Payload bytes per rank of one optimizer step, from the shapes alone (fp32 activations,
    int64 token ids). Tensor parallelism: one all-reduce per row-wise output and per column-wise
    input gradient (per block the fused q/k/v and the MLP's first layer; the head's input),
    gathers of the modulation vectors, three [N] reductions per cross entropy, two [t, N] gathers
    per argmax; with sequence parallelism each all-reduce of the stream becomes a reduce-scatter
    plus an all-gather. Data parallelism (FSDP2): each unit's parameters are gathered once per
    forward call and once per backward graph (`fsdp_units`), and every gradient is reduced once
    per step (a reduce-scatter, or with ddp an all-reduce), in both modes."""
    cfg, layout = trainer.cfg, trainer.layout
    b, A, L = cfg.data.micro_batch_size, trainer.accum, trainer.shape.seq_len
    D, C, N, t = cfg.model.d_model, cfg.model.cond_dim, cfg.model.n_layers, layout.tp
    sp = cfg.parallel.sequence_parallel
    total: dict[str, int] = defaultdict(int)

    def forward(n: int) -> None:
        if t == 1:
            return
        stream, modulation = n * L * D * 4, n * (N * 6 * D + 2 * D) * 4
        total["all_gather"] += modulation
        if sp:
            total["reduce_scatter"] += (1 + 2 * N) * stream
            total["all_gather"] += (2 * N + 1) * stream
        else:
            total["all_reduce"] += (1 + 2 * N) * stream

    def backward(n: int) -> None:
        if t == 1:
            return
        stream = n * L * D * 4
        total["all_reduce"] += (N + 1) * n * C * 4
        if sp:
            total["reduce_scatter"] += (2 * N + 1) * stream
            total["all_gather"] += (2 * N + 1) * stream
            total["all_reduce"] += n * (N * 6 * D + 2 * D) * 4  # modulation gradients (the sequence-slice hook)
        else:
            total["all_reduce"] += (2 * N + 1) * stream

    def loss_terms(n: int) -> None:  # cross entropy of both halves; argmax for y and for the metric
        if t > 1:
            total["all_reduce"] += 2 * 3 * n * L * 4
            total["all_gather"] += 2 * t * n * L * (4 + 8)

    for _ in range(A):
        if mode == "reuse":
            forward(b), forward(b), backward(b), backward(b)
        else:
            forward(b), forward(2 * b), backward(2 * b)
        loss_terms(b)
    if sp:
        total["all_reduce"] += (2 * N + 1) * D * 4  # norm weight gradients, summed once per step
    if layout.dp > 1:
        root, blocks = fsdp_units(trainer.parts[0], layout.dp)
        if cfg.parallel.data_parallel == "ddp":
            total["all_reduce"] += (root + blocks) // layout.dp  # each gradient once, the local tensors whole
        else:
            # Per micro-batch, two_pass: pass 1, pass 2 and its backward. reuse: two forwards and
            # two backward graphs; the root unit (embedding, head) stays gathered from the first
            # backward graph to the end of the step (its inputs, token ids, need no gradient, so
            # FSDP2 reshards it in its final callback), the blocks are resharded in between.
            gathered = 2 * (root + blocks) + 2 * blocks + root if mode == "reuse" else 3 * (root + blocks)
            total["all_gather"] += A * gathered
            total["reduce_scatter"] += root + blocks  # each unsharded gradient once
    return dict(total)


def fsdp_units(model: torch.nn.Module, dp: int) -> tuple[int, int]:
    """Bytes of the root FSDP unit's own parameters (embedding, head) and of the units inside it
    (the blocks): every parameter's tensor-parallel shard, whole (its local part times dp under
    fsdp; under ddp the local part is whole and the figures are dp times too large)."""
    inner = {id(p) for unit in model.modules() if unit is not model and isinstance(unit, FSDPModule)
             for p in unit.parameters()}
    sizes = {id(p): p.to_local().numel() * p.element_size() * dp for p in model.parameters()}
    blocks = sum(size for key, size in sizes.items() if key in inner)
    return sum(sizes.values()) - blocks, blocks


def main() -> None:
    shards, out, layouts = sys.argv[1], sys.argv[2], sys.argv[3:]
    env = init_distributed(detect_launch(), "cpu", 300.0)
    results = []
    for layout in layouts:
        for mode in ("reuse", "two_pass"):
            cfg = load_config(None, [*MODEL, f"data.shards={shards}", "logging.run_dir=/tmp/unused",
                                     f"train.step_mode={mode}", *layout.split()])
            trainer = Trainer(cfg, env)
            batches = iter(trainer.loader)
            trainer._train_step([next(batches) for _ in range(trainer.accum)])  # warm-up (lazy state)
            dist.barrier()
            counter = CountCollectives()
            start = time.perf_counter()
            with counter:
                trainer._train_step([next(batches) for _ in range(trainer.accum)])
            seconds = time.perf_counter() - start
            results.append({"layout": layout, "mode": mode, "bytes": dict(counter.bytes), "calls": dict(counter.calls),
                            "analytic": analytic(trainer, mode), "seconds": seconds, "accum": trainer.accum})
    if env.rank == 0:
        with open(out, "w") as stream:
            json.dump(results, stream, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
