"""Run under torchrun (2 ranks) by benchmarks/zero.py: the step time of DeepSpeed ZeRO-2 against
native FSDP2 (fully sharded, and keeping parameters between forward and backward, ZeRO-2-like) at
dp=2, one model and batch, in rounds that reverse the engines' order every other time.

    torchrun --nproc_per_node 2 benchmarks/zero_worker.py SHARDS OUT.json
"""

from __future__ import annotations

import json
import sys
import time

import torch.distributed as dist

from parallel.env import detect_launch, init_distributed
from pretrain.config import load_config
from pretrain.train import trainer_class

MODEL = ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.cond_dim=128", "data.num_workers=0",
         "logging.progress=false", "optim.warmup_steps=0", "data.global_batch_size=16", "data.micro_batch_size=4",
         "parallel.dp=2", "logging.run_dir=/tmp/unused"]
ENGINES = {"fsdp": ["parallel.data_parallel=fsdp"], "fsdp_no_reshard": ["parallel.data_parallel=fsdp_no_reshard"],
           "zero2": ["parallel.engine=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2.json"]}
WARMUP, ROUNDS, STEPS = 2, 7, 3


def main() -> None:
    shards, out = sys.argv[1], sys.argv[2]
    env = init_distributed(detect_launch(), "cpu", 600.0)
    trainers, batches = {}, {}
    for name, overrides in ENGINES.items():
        cfg = load_config(None, [*MODEL, f"data.shards={shards}", *overrides])
        trainers[name] = trainer_class(cfg)(cfg, env)
        batches[name] = iter(trainers[name].loader)

    def steps(name: str, count: int) -> float:
        trainer = trainers[name]
        dist.barrier()
        start = time.perf_counter()
        for _ in range(count):
            trainer._train_step([next(batches[name]) for _ in range(trainer.accum)])
            trainer.state.step += 1
        dist.barrier()
        return (time.perf_counter() - start) / count

    for name in ENGINES:
        steps(name, WARMUP)
    rounds = []
    for index in range(ROUNDS):
        order = list(ENGINES) if index % 2 == 0 else list(reversed(ENGINES))
        rounds.append({name: steps(name, STEPS) for name in order})
    if env.rank == 0:
        with open(out, "w") as stream:
            json.dump(rounds, stream)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
