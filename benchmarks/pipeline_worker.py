"""Run under torchrun (2 ranks, pp=2) by benchmarks/pipeline.py.

For each schedule and micro-batch count, times one training step of the two-pass ProSeCo step:
the wall time of pass 1 (forward-only pipeline) and pass 2 (the training schedule), and each
stage's busy time (its PipelineStage forward and backward computations). The bubble is the share
of pass 2 a stage spends idle.

    torchrun --nproc_per_node 2 benchmarks/pipeline_worker.py SHARDS OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch.distributed as dist
from torch.distributed.pipelining import stage as stage_module

from parallel.env import detect_launch, init_distributed
from parallel.pipeline import PipelineRunner
from pretrain.config import load_config
from pretrain.train import Trainer

MODEL = ["model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.cond_dim=128", "data.num_workers=0",
         "logging.progress=false", "optim.warmup_steps=0", "train.step_mode=two_pass", "parallel.pp=2"]
CASES = [("gpipe", 1, 4), ("1f1b", 1, 4), ("1f1b", 1, 8), ("interleaved_1f1b", 2, 4), ("interleaved_1f1b", 2, 8)]
MICRO = 4

busy: dict[str, float] = defaultdict(float)


def _timed(method, key):
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            busy[key] += time.perf_counter() - start
    return wrapper


def main() -> None:
    shards, out = sys.argv[1], sys.argv[2]
    base = stage_module._PipelineStageBase
    for name in ("forward_one_chunk", "backward_one_chunk"):
        if hasattr(base, name):
            setattr(base, name, _timed(getattr(base, name), "compute"))
    passes: list[tuple[float, float]] = []  # (wall, busy) of each pipeline pass
    run = PipelineRunner.run

    def timed_run(self, *args, **kwargs):
        start, busy_before = time.perf_counter(), busy["compute"]
        run(self, *args, **kwargs)
        passes.append((time.perf_counter() - start, busy["compute"] - busy_before))

    PipelineRunner.run = timed_run
    env = init_distributed(detect_launch(), "cpu", 600.0)
    results = []
    for schedule, virtual, microbatches in CASES:
        cfg = load_config(None, [*MODEL, f"data.shards={shards}", "logging.run_dir=/tmp/unused",
                                 f"parallel.pp_schedule={schedule}", f"parallel.pp_virtual_stages={virtual}",
                                 f"data.micro_batch_size={MICRO}", f"data.global_batch_size={MICRO * microbatches}"])
        trainer = Trainer(cfg, env)
        batches = iter(trainer.loader)
        for _ in range(3):  # the first step builds the schedules and infers shapes
            passes.clear()
            busy.clear()
            dist.barrier()
            trainer.forward_backward([next(batches) for _ in range(trainer.accum)])
            trainer.optimizers.zero_grad()
        (pass1, _), (pass2, busy2) = passes
        results.append({"schedule": schedule, "virtual": virtual, "microbatches": microbatches, "rank": env.rank,
                        "pass1_s": pass1, "pass2_s": pass2, "pass2_busy_s": busy2})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if env.rank == 0:
        with open(out, "w") as stream:
            json.dump([row for rows in gathered for row in rows], stream, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
