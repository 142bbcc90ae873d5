"""Run under torchrun by tests/test_deepspeed.py (gloo, CPU, DeepSpeed's CPU accelerator).

    parity SHARDS OUT.json       native dp=2 (FSDP2) against DeepSpeed ZeRO-1, 2, 3, 2 with the
                                 optimizer state offloaded and 3 in bf16 offloaded, both step
                                 modes, a few optimizer steps each: losses and gradient norms
    runs RUNS.json               several `proseco train` runs (a JSON list of override lists) in one
                                 process group, one after the other (a launch costs seconds)
    nonfinite SHARDS OUT.json DIR  ZeRO-1, 2, 3 in fp32: a NaN loss (finite gradients, rank 0) and an
                                 Inf gradient (finite loss, rank 1) injected at chosen steps, with
                                 train.on_nonfinite=skip then stop, against a run that leaves those
                                 steps out; then a `proseco train` run stopped by a NaN loss

Rank 0 writes OUT.json; tests read it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import pretrain.train as train_module
from parallel.deepspeed_engine import held, whole_from_partitions
from parallel.env import DistEnv, detect_launch, init_distributed
from pretrain.config import load_config, validate
from pretrain.models.dit.model import DiT
from pretrain.train import NonFiniteError, trainer_class
from tests.dist.parallel_worker import TINY, random_init

STEPS = 3
DEEPSPEED = "parallel.engine=deepspeed"
ENGINES = {"native": ["parallel.data_parallel=fsdp"],
           **{f"zero{kind}": [DEEPSPEED, f"parallel.deepspeed_config=configs/deepspeed/zero{kind}.json"]
              for kind in (1, 2, 3, "2-offload", "3-bf16-offload")}}
BF16 = {"zero3-bf16-offload": ["train.precision=bf16"]}


def train_steps(cfg, env: DistEnv) -> dict:
    """STEPS optimizer steps of the run loop's own step function; the per-step records."""
    trainer = trainer_class(cfg)(cfg, env)
    batches = iter(trainer.loader)
    records = []
    for _ in range(STEPS):
        record = trainer._train_step([next(batches) for _ in range(trainer.accum)])
        trainer.state.step += 1
        records.append({k: record[k] for k in ("loss", "mdlm_nelbo", "corrector_nll", "grad_norm")})
    return {"records": records, "ema_matches_weights": ema_matches_weights(trainer)}


def ema_matches_weights(trainer) -> bool | None:
    """ZeRO-3: each rank's partitions of the weights, gathered and put back together as the EMA
    files are (whole_from_partitions), equal the weights DeepSpeed gathers itself: the partition
    layout the EMA relies on."""
    if getattr(trainer, "zero_stage", 0) != 3:
        return None
    import deepspeed

    for p in trainer.engine.module.parameters():
        mine = held(p).detach().float().contiguous()
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        with deepspeed.zero.GatheredParameters([p]):
            if not torch.equal(whole_from_partitions(parts, tuple(p.shape)), p.detach().float()):
                return False
    return True


def parity(shards: str, out: str, env: DistEnv) -> None:
    DiT.init_weights = random_init  # non-zero gradients everywhere (see parallel_worker.py)
    results = {}
    for mode in ("reuse", "two_pass"):
        base = [f"data.shards={shards}", "logging.run_dir=/tmp/unused", *TINY, f"train.step_mode={mode}",
                "optim.lr=1e-3", "optim.ema_decay=0.5", "optim.grad_clip=0.5", "parallel.dp=2"]
        for engine, overrides in ENGINES.items():
            cfg = load_config(None, [*base, *overrides, *BF16.get(engine, [])])
            validate(cfg, env.world_size)
            results[f"{mode}/{engine}"] = train_steps(cfg, env)
    if env.rank == 0:
        with open(out, "w") as stream:
            json.dump(results, stream, indent=1)


def runs(spec: str, env: DistEnv) -> None:
    with open(spec) as stream:
        for overrides in json.load(stream):
            cfg = load_config(None, [*TINY, *overrides])
            validate(cfg, env.world_size)
            trainer_class(cfg)(cfg, env).run()
            dist.barrier()


POISON: dict[int, str] = {}
"""step -> "loss" (rank 0's loss times NaN: the global loss is NaN, the gradients stay finite) or
"grad" (rank 1's final-layer output gradient times Inf: the loss stays finite, every gradient is
NaN/Inf)."""


def poisoned_forward_backward(runner, batches, objective, step, *args, **kwargs):
    kind, handles = POISON.get(step), []
    if kind == "grad" and dist.get_rank() == 1:
        def poison_output(module, inputs, output):
            output.register_hook(lambda grad: grad * math.inf)

        # On the final layer: its output is the logits or (chunked loss) the features the loss
        # projects; either way every gradient behind it turns Inf/NaN.
        handles.append(runner.parts[0].output_layer.register_forward_hook(poison_output))
    try:
        metrics = REAL_FORWARD_BACKWARD(runner, batches, objective, step, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if kind == "loss" and dist.get_rank() == 0:
        metrics.loss = metrics.loss * math.nan
    return metrics


REAL_FORWARD_BACKWARD = train_module.forward_backward


def tensors_of(trainer) -> dict[str, torch.Tensor]:
    """Everything a step may change on this rank: the weights forward uses, DeepSpeed's fp32
    master copy, AdamW's moments and step counts, the EMA and its count."""
    engine, found = trainer.engine, {}
    for name, p in engine.module.named_parameters():
        found[f"weight.{name}"] = held(p).detach().clone()
    masters = getattr(engine.optimizer, "single_partition_of_fp32_groups", None) or \
        engine.optimizer.fp32_partitioned_groups_flat
    for i, flat in enumerate(masters):
        found[f"master.{i}"] = flat.detach().clone()
    for i, state in enumerate(engine.optimizer.optimizer.state.values()):
        if not any(torch.as_tensor(value).any() for value in state.values()):
            continue  # zero moments at step 0 (a withheld first step sets them): as no state yet
        for key, value in state.items():
            found[f"adamw.{i}.{key}"] = torch.as_tensor(value).clone()
    for name, tensor in trainer.ema.shadow.items():
        found[f"ema.{name}"] = tensor.clone()
    found["ema.num_updates"] = torch.tensor(trainer.ema.num_updates)
    return found


def full_moments(trainer) -> dict[str, torch.Tensor]:
    """AdamW's moments as DeepSpeed's per-parameter views give them (what universal checkpoints
    and set_full_state use; ZeRO-1/2 link these views once, at the first optimizer step)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return {f"full.{name}.{key}": safe_get_full_optimizer_state(p, key).clone()
            for name, p in trainer.engine.module.named_parameters() for key in ("exp_avg", "exp_avg_sq")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names whose tensors differ, bit for bit (empty: the same), on any rank."""
    differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, differ)
    return sorted({k for names in everyone for k in names})


def nonfinite(shards: str, out: str, root: str, env: DistEnv) -> None:
    """Per ZeRO stage, one trainer stepped by hand: step 0 a NaN loss (before any update: AdamW has
    no state yet), 1 as usual, 2 an Inf gradient, 3 as usual (on_nonfinite=skip), then 4 a NaN loss
    with on_nonfinite=stop; and one reference trainer that leaves steps 0 and 2 out (their
    batches drawn, no step run)."""
    DiT.init_weights = random_init  # non-zero gradients everywhere (see parallel_worker.py)
    train_module.forward_backward = poisoned_forward_backward
    results = {}
    for stage in (1, 2, 3):
        overrides = [f"data.shards={shards}", f"logging.run_dir={root}/unused", *TINY, "optim.lr=1e-3",
                     "optim.ema_decay=0.5", "optim.grad_clip=0.5", "train.on_nonfinite=skip",
                     "train.max_skipped_steps=2", *ENGINES[f"zero{stage}"]]
        cfg = load_config(None, overrides)
        validate(cfg, env.world_size)
        got, records = {}, {}
        for role in ("skipping", "reference"):
            trainer = trainer_class(cfg)(cfg, env)
            batches = iter(trainer.loader)
            POISON.clear()
            POISON.update({0: "loss", 2: "grad"} if role == "skipping" else {})
            for step in range(4):
                micro = [next(batches) for _ in range(trainer.accum)]
                if role == "reference" and step in (0, 2):
                    trainer.state.step += 1  # the update that never happened
                    continue
                before = tensors_of(trainer)
                record = trainer._train_step(micro)
                trainer.state.step += 1
                engine = trainer.engine
                records[f"{role}/{step}"] = {
                    "loss": record["loss"], "grad_norm": record["grad_norm"],
                    "skipped_steps": trainer.state.skipped_steps, "changed": same(before, tensors_of(trainer)),
                    "deepspeed": [engine.micro_steps, engine.global_steps, engine.skipped_steps]}
            got[role] = {**tensors_of(trainer), **full_moments(trainer)}
        # The same trainer, on_nonfinite=stop: raises, the weights as they were.
        trainer.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, on_nonfinite="stop"))
        before = tensors_of(trainer)
        POISON.update({4: "loss"})
        try:
            trainer._train_step([next(batches) for _ in range(trainer.accum)])
            stopped = None
        except NonFiniteError as err:
            stopped = str(err)
        records["stop"] = {"error": stopped, "changed": same(before, tensors_of(trainer))}
        records["skipped_vs_reference"] = same(got["skipping"], got["reference"])
        results[f"zero{stage}"] = records
    results["run"] = stopped_run(shards, root, env)
    if env.rank == 0:
        with open(out, "w") as stream:
            json.dump(results, stream, indent=1)


def stopped_run(shards: str, root: str, env: DistEnv) -> dict:
    """`proseco train` under ZeRO-3, a checkpoint every step, a NaN loss at step 2 (the third):
    NonFiniteError; rank 0 writes the whole in-memory weights for the test to compare with the
    last checkpoint's."""
    import deepspeed
    from safetensors.torch import save_file

    run_dir = Path(root) / "stopped"
    cfg = load_config(None, [f"data.shards={shards}", f"logging.run_dir={run_dir}", *TINY, "optim.lr=1e-3",
                             "train.max_steps=4", "checkpoint.every=1", "train.eval_every=0",
                             "train.on_nonfinite=stop", *ENGINES["zero3"]])
    validate(cfg, env.world_size)
    POISON.clear()
    POISON.update({2: "loss"})
    trainer = trainer_class(cfg)(cfg, env)
    try:
        trainer.run()
        error = None
    except NonFiniteError as err:
        error = str(err)
    whole = {}
    for name, p in trainer.engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            whole[name] = p.detach().clone().contiguous()
    if env.rank == 0:
        save_file(whole, str(run_dir / "in_memory.safetensors"))
    return {"error": error, "step": trainer.state.step}


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    env = init_distributed(detect_launch(), "cpu", 120.0)
    if command == "parity":
        parity(args[0], args[1], env)
    elif command == "runs":
        runs(args[0], env)
    elif command == "nonfinite":
        nonfinite(args[0], args[1], args[2], env)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
