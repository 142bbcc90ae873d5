"""Run under torchrun (2 ranks, gloo) by tests/test_plan.py: LLaDA's tensor-parallel payloads per
step, measured, against the plan's count (pretrain/plan/timing.py).

The DiT's count is benchmarks/comm_worker.py's analytic one (measured there); LLaDA's three q/k/v
projections and two SwiGLU inputs make other per-block counts, checked here the same way: every
collective of one training step is recorded (comm_worker.CountCollectives) at tp=2, with and
without sequence parallelism, in both step modes.

    torchrun --nproc_per_node 2 benchmarks/plan_comm_worker.py SHARDS OUT.json
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from benchmarks.comm_worker import CountCollectives
from parallel.env import detect_launch, init_distributed
from pretrain.config import load_config
from pretrain.plan import make_layout
from pretrain.plan.timing import tp_payloads
from pretrain.train import Trainer

MODEL = ["model.family=llada", "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.mlp_hidden_size=320", "data.global_batch_size=8", "data.micro_batch_size=2", "data.num_workers=0",
         "logging.progress=false", "optim.warmup_steps=0", "parallel.tp=2"]


def main() -> None:
    shards, out = sys.argv[1], sys.argv[2]
    env = init_distributed(detect_launch(), "cpu", 300.0)
    results = []
    for sp in (False, True):
        for mode in ("reuse", "two_pass"):
            cfg = load_config(None, [*MODEL, f"data.shards={shards}", "logging.run_dir=/tmp/unused",
                                     f"train.step_mode={mode}", f"parallel.sequence_parallel={str(sp).lower()}"])
            trainer = Trainer(cfg, env)
            batches = iter(trainer.loader)
            trainer._train_step([next(batches) for _ in range(trainer.accum)])  # warm-up (lazy state)
            dist.barrier()
            counter = CountCollectives()
            with counter:
                trainer._train_step([next(batches) for _ in range(trainer.accum)])
            batches.close()
            layout = make_layout(trainer.cfg, env.world_size, "cpu")
            m = trainer.cfg.model
            plan = tp_payloads("llada", layout, m.d_model, 0, m.n_layers, last_stage=True, first_stage=True)
            results.append({"sequence_parallel": sp, "mode": mode, "bytes": dict(counter.bytes), "plan": dict(plan)})
    if env.rank == 0:
        with open(out, "w") as stream:
            json.dump(results, stream, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
