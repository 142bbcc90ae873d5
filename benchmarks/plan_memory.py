"""`proseco plan` against the memory a training step really takes, on CPU.

For a run config (a tiny shard folder made here, overrides for the model and the layout), a
worker process builds the trainer as `proseco train` does and runs two optimizer steps (the first
allocates AdamW's moments, the second is the steady state) while torch.profiler records every
allocation and free of torch's allocator; the peak of their running sum, from before the model
was built, is the most memory torch held at once: what torch.cuda.max_memory_allocated would say
on a GPU, free of the C allocator's fragmentation that resident-memory figures include, and the
same from run to run (one thread, the same allocations in the same order; on two ranks the
frees the profiler misses on gloo's threads are put back, `_allocations`). Beside it: the peak of
the second step above the state before it (activations and gradients) and the plan's figures for
the same config (pretrain/plan).

    python -m benchmarks.plan_memory
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Four small configs on which the plan is checked (tests/test_plan.py): the DiT in reuse mode with
# the chunked loss, the DiT two-pass with activation checkpointing and whole logits, LLaDA in reuse
# mode under bf16 autocast (its weight copies) with accumulation over two micro-batches, and a DiT
# whose blocks are most of its memory in reuse mode with activation checkpointing and two
# micro-batches, where the y graph's gradients buffered through backward are a fifth of the peak.
_BLOCK_HEAVY_DIT = ["model.d_model=256", "model.n_layers=6", "model.n_heads=4", "model.cond_dim=64",
                    "model.vocab_size=1024", "diffusion.loss_chunk_tokens=256", "optim.ema_decay=0",
                    "parallel.activation_checkpointing=true", "data.micro_batch_size=1", "train.step_mode=reuse"]
CONFIGS = {
    "dit_reuse": ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.cond_dim=64",
                  "model.vocab_size=2048", "data.global_batch_size=8", "data.micro_batch_size=8",
                  "diffusion.loss_chunk_tokens=256", "train.step_mode=reuse"],
    "dit_two_pass_ac": ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.cond_dim=64",
                        "model.vocab_size=1024", "data.global_batch_size=8", "data.micro_batch_size=4",
                        "diffusion.loss_chunk_tokens=0", "train.step_mode=two_pass",
                        "parallel.activation_checkpointing=true"],
    "llada_reuse_bf16": ["model.family=llada", "model.d_model=128", "model.n_layers=3", "model.n_heads=4",
                         "model.mlp_hidden_size=320", "model.vocab_size=2048", "data.global_batch_size=8",
                         "data.micro_batch_size=4", "diffusion.loss_chunk_tokens=512", "train.step_mode=reuse",
                         "train.precision=bf16"],
    "dit_reuse_ac_accum": [*_BLOCK_HEAVY_DIT, "data.global_batch_size=2"],
}
# The same check on two ranks (torchrun, gloo), every rank against the plan of its pipeline rank:
# FSDP2 sharding with its gathered units, replicated (ddp), 1F1B with two stages, tensor parallelism,
# FSDP2 in reuse mode with activation checkpointing, whose buffered y-graph gradients are of the
# unsharded parameters, and FSDP2 accumulating two micro-batches (its unsharded gradients until the
# last one's reduction).
_SMALL_DIT = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.cond_dim=64",
              "model.vocab_size=2048", "data.global_batch_size=8", "diffusion.loss_chunk_tokens=256"]
TWO_RANK_CONFIGS = {
    "dp2_fsdp": [*_SMALL_DIT, "data.micro_batch_size=4", "parallel.dp=2", "train.step_mode=reuse"],
    "dp2_ddp": [*_SMALL_DIT, "data.micro_batch_size=4", "parallel.dp=2", "parallel.data_parallel=ddp",
                "train.step_mode=reuse"],
    "pp2_1f1b": [*_SMALL_DIT, "data.micro_batch_size=2", "parallel.pp=2", "train.step_mode=two_pass"],
    "tp2": [*_SMALL_DIT, "data.micro_batch_size=4", "parallel.tp=2", "train.step_mode=reuse"],
    "dp2_fsdp_reuse_ac": [*_BLOCK_HEAVY_DIT, "data.global_batch_size=2", "parallel.dp=2"],
    "dp2_fsdp_accum_two_pass": [*_BLOCK_HEAVY_DIT, "data.global_batch_size=4", "parallel.dp=2",
                                "train.step_mode=two_pass"],
}
SEQ_LEN = 128
COMMON = ["data.num_workers=0", "logging.progress=false", "optim.warmup_steps=0", "logging.wandb=disabled",
          "checkpoint.every=0"]


def _allocations(profiler) -> list[tuple[int, int]]:
    """(time, bytes) of every allocation (+) and free (-) of torch's CPU allocator the profiler saw,
    with the frees it could not see put back. The profiler records a free only on a thread it
    profiles, and gloo's worker threads sometimes drop the last reference to a collective's tensor
    (which one does varies from run to run): such a block would count as held to the end. Its
    address coming back from a later allocation proves it was freed by then, so it is freed there
    (the latest it can have been: the peak stays an upper bound). With this, everything allocated
    is freed by the end of a two-rank run; without it 7-25 MiB per rank stayed counted."""
    found = []

    def walk(nodes) -> None:
        for node in nodes:
            if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
                found.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
            walk(node.children)

    walk(profiler.profiler.kineto_results.experimental_event_tree())
    live: dict[int, int] = {}
    events = []
    for when, ptr, nbytes in sorted(found):
        if nbytes > 0 and ptr in live:  # an unseen free of the block that held this address
            events.append((when, -live.pop(ptr)))
        if nbytes > 0:
            live[ptr] = nbytes
        elif live.pop(ptr, None) is None:
            continue  # the free of a block allocated before profiling began (or already put back)
        events.append((when, nbytes))
    return events


def _running_sums(events: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(time, bytes held after it) for allocations (+) and frees (-) in time order."""
    live, sums = 0, []
    for when, nbytes in sorted(events):
        live += nbytes
        sums.append((when, live))
    return sums


def measure(shards: str, overrides: list[str], run_dir: str) -> list[dict]:
    """In this process (one rank of a launch, or the only one): the peak bytes torch held while
    building the trainer and running two optimizer steps, and the bytes held when the second
    began; every rank's, in rank order (on rank 0; the others return an empty list)."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    from parallel.env import detect_launch, init_distributed, shutdown
    from pretrain.config import load_config
    from pretrain.train import Trainer

    torch.set_num_threads(1)
    cfg = load_config(None, [*COMMON, *overrides, f"data.shards={shards}", f"logging.run_dir={run_dir}"])
    env = init_distributed(detect_launch(), "cpu", 300.0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        trainer = Trainer(cfg, env)
        batches = iter(trainer.loader)
        trainer._train_step([next(batches) for _ in range(trainer.accum)])
        second = [next(batches) for _ in range(trainer.accum)]
        with record_function("second_step"):
            trainer._train_step(second)
    batches.close()
    events = profiler.profiler.kineto_results.events()
    sums = _running_sums(_allocations(profiler))
    marker = next(e for e in events if e.name() == "second_step")
    before = [live for when, live in sums if when < marker.start_ns()]
    during = [live for when, live in sums if marker.start_ns() <= when <= marker.end_ns()]
    mine = {"peak_bytes": max(live for _, live in sums), "second_step_start_bytes": before[-1],
            "second_step_peak_bytes": max(during), "rank": env.rank}
    if env.world_size == 1:
        return [mine]
    every: list = [None] * env.world_size
    dist.all_gather_object(every, mine)
    dist.barrier()
    shutdown()
    return every if env.rank == 0 else []


def run_worker(shards: Path, overrides: list[str], run_dir: Path, world_size: int = 1) -> list[dict]:
    """`measure` in fresh processes (nothing allocated before it but what it allocates itself): one,
    or `world_size` under torchrun (gloo); every rank's figures in rank order."""
    root = Path(__file__).resolve().parents[1]
    launcher = ([sys.executable] if world_size == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"])
    command = [*launcher, str(root / "benchmarks" / "plan_memory.py"), "--worker", str(shards), str(run_dir),
               json.dumps(overrides)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=root, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    return json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("[")))


def planned(shards: Path, overrides: list[str], world_size: int = 1) -> list[float]:
    """The plan's peak bytes of each global rank for the same config (CPU: dropout masks in the
    activation dtype)."""
    from pretrain.config import load_config
    from pretrain.plan import Assumptions, plan_config

    cfg = load_config(None, [*COMMON, *overrides, f"data.shards={shards}"])
    plan = plan_config(cfg, world_size=world_size, assumptions=Assumptions(device="cpu"))
    per_stage = {rank.pp_rank: rank.total for rank in plan.ranks}
    # Global rank r sits at pipeline rank r // (dp * tp) (parallel/mesh.py).
    return [per_stage[r // (plan.layout.dp * plan.layout.tp)] for r in range(world_size)]


def run() -> list[dict]:
    from tests.helpers import make_word_shards

    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as root:
        shards = make_word_shards(Path(root), seq_len=SEQ_LEN)
        runs = [(name, overrides, 1) for name, overrides in CONFIGS.items()]
        runs += [(name, overrides, 2) for name, overrides in TWO_RANK_CONFIGS.items()]
        for name, overrides, world in runs:
            measured = run_worker(shards, overrides, Path(root) / name, world)
            for rank, (got, plan) in enumerate(zip(measured, planned(shards, overrides, world))):
                where = f"_rank{rank}" if world > 1 else ""
                rows.append({"name": f"plan_over_measured_memory_{name}{where}",
                             "value": round(plan / got["peak_bytes"], 3), "unit": "ratio",
                             "what": f"proseco plan's peak bytes of the rank / the measured peak of torch's "
                                     f"allocator over two optimizer steps on CPU ({got['peak_bytes'] / 2**20:.1f} MiB "
                                     f"measured, {plan / 2**20:.1f} MiB planned); {world} rank(s), "
                                     f"{' '.join(overrides)}"})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        shards, run_dir, overrides = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        ranks = measure(shards, overrides, run_dir)
        if ranks:
            print(json.dumps(ranks))
        return
    for row in run():
        print(f"{row['name']} = {row['value']} {row['unit']}  ({row['what']})")


if __name__ == "__main__":
    main()
