"""Run under torchrun by tests/test_parallel.py (gloo, CPU).

    parity SHARDS OUT.json [LABELS] every layout this world size allows against one process (with a
                                    label set of SHARDS: also labelled runs, classifier-free guidance)
    continue OUT.json [a=b ...]     resume at this layout, dump what was loaded, train on
    train [a=b ...]                 `proseco train` with overrides (PROSECO_TEST_DIE=rank=R,step=S[,stamp=FILE]
                                    kills rank R before step S, writing the time of death to FILE)

Rank 0 writes OUT.json; tests read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from benchmarks.comm_worker import CountCollectives, analytic
from parallel.env import DistEnv, detect_launch, init_distributed
from parallel.gradients import global_grad_norm
from pretrain.checkpoint import app_state
from pretrain.config import load_config, validate
from pretrain.models.dit.model import DiT
from pretrain.models.init import Init, keyed_init
from pretrain.train import Trainer, train

TINY = ["model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.cond_dim=16", "model.vocab_multiple=8",
        "data.global_batch_size=8", "data.micro_batch_size=2", "data.num_workers=0", "logging.progress=false",
        "optim.warmup_steps=0"]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def digest(tensor: torch.Tensor) -> str:
    """Hash of the full tensor's bytes: equal digests mean bit-identical tensors."""
    return hashlib.sha256(full(tensor).detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def one_step(trainer: Trainer, counter: CountCollectives | None = None
             ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Loss terms and full gradients of the first global batch, on this trainer's layout (the
    collectives of its forward and backward recorded by `counter`)."""
    batches = iter(trainer.loader)
    with counter if counter is not None else nullcontext():
        sums = trainer.forward_backward([next(batches) for _ in range(trainer.accum)])
    named = [(name, p) for part in trainer.parts for name, p in part.named_parameters()]
    for name, p in named:  # final gradients, not deferred partial sums
        assert not any(pl.is_partial() for pl in getattr(p.grad, "placements", ())), name
    grads = {name: full(p.grad).clone() for name, p in named}
    if trainer.layout.pp > 1:  # each stage holds some parameters: gather all of them on every rank
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, {k: v.cpu() for k, v in grads.items()})
        grads = {k: v for shard in shards for k, v in shard.items()}
    pp_group = trainer.mesh["pp"].get_group() if trainer.layout.pp > 1 else None
    grads["global_norm"] = global_grad_norm(trainer._parameters(), pp_group).reshape(1)  # what clipping sees
    trainer.optimizers.zero_grad()
    return sums, grads


def random_init(model, seed: int = 0) -> None:
    """Non-zero weights everywhere: at the real initialisation the zero adaLN gates give every
    attention and MLP weight a zero gradient, which would make parity trivial. Keyed by name and
    position (pretrain/models/init.py), so every layout's shards hold the same weights."""
    keyed_init(model, seed, lambda *_: Init.normal(0.1))


def layouts(world: int) -> list[list[str]]:
    """The reference computes the loss from whole logits; layouts with `chunks` from 5 tokens at a
    time (32 per micro-batch, 64 two-pass), the rest from whole logits too."""
    pp = ["parallel.pp=2", "train.step_mode=two_pass"]
    chunks = "diffusion.loss_chunk_tokens=5"
    if world == 2:
        return [["parallel.dp=2", "parallel.data_parallel=fsdp", chunks],
                ["parallel.dp=2", "parallel.data_parallel=ddp"],
                ["parallel.dp=2", "parallel.data_parallel=fsdp_no_reshard", "parallel.activation_checkpointing=true"],
                ["parallel.tp=2", chunks], ["parallel.tp=2", "parallel.sequence_parallel=true", chunks],
                [*pp, "parallel.pp_schedule=gpipe"], [*pp, chunks, "parallel.pp_schedule=1f1b"],
                [*pp, chunks, "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"]]
    if world == 4:
        return [["parallel.dp=2", "parallel.tp=2", chunks],
                ["parallel.dp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.data_parallel=ddp"],
                [*pp, "parallel.tp=2"], [*pp, "parallel.dp=2"]]
    if world == 8:
        return [[*pp, "parallel.tp=2", "parallel.dp=2"]]
    raise SystemExit(f"no layouts for world size {world}")


def labelled_layouts(world: int, mode: str) -> list[list[str]]:
    """Labelled runs (2 ranks): the class labels and their keyed dropout on dp=2 and tp=2 (reuse) and
    across pipeline stages (two-pass: stage 0 adds the labels to c, which travels on)."""
    if world != 2:
        return []
    if mode == "reuse":
        return [["parallel.dp=2", "parallel.data_parallel=fsdp"], ["parallel.tp=2"]]
    return [["parallel.pp=2", "train.step_mode=two_pass", "parallel.pp_schedule=1f1b"]]


def parity(shards: str, out: str, env: DistEnv, labels: str | None = None) -> None:
    DiT.init_weights = random_init
    results = []
    single = DistEnv(0, 1, 0, env.device, "single")
    cases = [("reuse", []), ("two_pass", [])]
    if labels is not None:  # half the labels dropped, so that the null class is trained too
        cases += [(mode, [f"data.labels={labels}", "diffusion.cond_dropout=0.5"]) for mode in ("reuse", "two_pass")]
    for mode, extra in cases:
        base = [f"data.shards={shards}", "logging.run_dir=/tmp/unused", *TINY, f"train.step_mode={mode}",
                "diffusion.loss_chunk_tokens=0", *extra]
        reference = Trainer(load_config(None, base), single)
        ref_sums, ref_grads = one_step(reference)
        for layout in (labelled_layouts(env.world_size, mode) if extra else layouts(env.world_size)):
            if mode == "reuse" and "parallel.pp=2" in layout:
                continue  # reuse needs the whole model in one stage (the config rejects it)
            cfg = load_config(None, [*base, *layout])
            validate(cfg, env.world_size)
            trainer, counter = Trainer(cfg, env), CountCollectives()
            sums, grads = one_step(trainer, counter)
            errors = {n: (grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads}
            grad_error = max(errors.values())
            worst = max(errors, key=errors.get)
            grad_scale = max(g.abs().max().item() for g in ref_grads.values())
            results.append({"mode": mode, "layout": " ".join([*extra, *layout]), "loss": sums["loss"],
                            "reference_loss": ref_sums["loss"],
                            "loss_error": max(abs(sums[k] - ref_sums[k]) for k in ref_sums),
                            "grad_error": grad_error, "grad_scale": grad_scale, "worst": worst,
                            "names_match": sorted(grads) == sorted(ref_grads), **reduced_bytes(trainer, mode, counter),
                            # labelled runs: the label embedding is trained (its gradient is compared above)
                            "label_grad": float(ref_grads["cond_map.embedding_table.weight"].abs().max()) if extra
                            else None})
    if env.rank == 0:
        with open(out, "w") as stream:
            json.dump(results, stream, indent=1)


def reduced_bytes(trainer: Trainer, mode: str, counter: CountCollectives) -> dict[str, int]:
    """Data-parallel layouts (tp = pp = 1): the payload this rank reduced in one step's forward and
    backward (gradients, plus the step's few scalar sums) and the analytic count of its gradient
    reductions, each gradient once (benchmarks/comm_worker.py)."""
    if trainer.layout.dp == 1 or trainer.layout.tp > 1 or trainer.layout.pp > 1:
        return {}
    kinds = ("reduce_scatter", "all_reduce")
    expected = analytic(trainer, mode)
    return {"reduced_bytes": sum(counter.bytes.get(kind, 0) for kind in kinds),
            "analytic_reduced_bytes": sum(expected.get(kind, 0) for kind in kinds)}


def dump_digests(trainer: Trainer) -> dict:
    """Digests of the full weights, EMA and Adam moments a trainer holds, and its data position."""
    state = app_state(trainer.parts, trainer.optimizers.optimizers, trainer.ema.shadow)
    flat = {}
    for section in ("model", "ema"):
        for name, tensor in state[section].items():
            flat[f"{section}.{name}"] = digest(tensor)
    for name, value in state["optim"].items():
        if isinstance(value, torch.Tensor):  # state.<param>.<exp_avg|exp_avg_sq|step>
            flat[f"optim.{name}"] = digest(value)
    return {"state": flat, "data": trainer.loader.state_dict(), "step": trainer.state.step}


def resume_dump_and_train(out: str, overrides: list[str], env: DistEnv) -> None:
    """Resume at this layout, write what was loaded, then train on to train.max_steps."""
    trainer = Trainer(load_config(None, [*TINY, *overrides]), env)
    trainer._resume()
    digests = dump_digests(trainer)
    if env.rank == 0:
        with open(out, "w") as stream:
            json.dump(digests, stream)
    trainer.run()


def die_on_request(trainer: type[Trainer] = Trainer) -> None:
    """PROSECO_TEST_DIE=rank=R,step=S: rank R exits abruptly (code 17) before optimizer step S
    (0-based: after S steps) of a `trainer` (the native Trainer, or an engine's subclass)."""
    spec = dict(item.split("=") for item in os.environ.get("PROSECO_TEST_DIE", "").split(",") if item)
    if not spec or int(os.environ["RANK"]) != int(spec["rank"]):
        return
    original = trainer._train_step

    def step(self, micro_batches):
        if self.state.step == int(spec["step"]):
            if "stamp" in spec:  # when it died, for benchmarks/faults.py
                with open(spec["stamp"], "w") as stream:
                    stream.write(repr(time.time()))
            os._exit(17)
        return original(self, micro_batches)

    trainer._train_step = step


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "train":
        die_on_request()
        if "parallel.engine=deepspeed" in args:
            from pretrain.engines.deepspeed import DeepSpeedTrainer

            die_on_request(DeepSpeedTrainer)
        train(load_config(None, [*TINY, *args]))
        return
    env = init_distributed(detect_launch(), "cpu", 60.0)
    if command == "parity":
        parity(args[0], args[1], env, *args[2:3])
    elif command == "continue":
        resume_dump_and_train(args[0], args[1:], env)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
