"""Run under torchrun by tests/test_data.py: each rank streams its share, saves, resumes, dumps.

    torchrun --standalone --nproc_per_node 2 tests/dist/loader_worker.py SHARD_FOLDER OUT_DIR

Each data-parallel rank (here: every rank) reads `RESUME_STEP` optimizer steps with 2 DataLoader
workers, takes the loader state (identical on every rank, checked with an all_gather), builds
a new loader from that state and reads on to `STEPS`. It writes OUT_DIR/rank<r>.json with, per
step, the positions and the sample ids (token row[0]) of its micro-batches in order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from pretrain.data import TrainLoader

STEPS, RESUME_STEP = 8, 3
GLOBAL_BATCH, MICRO_BATCH, WORKERS, SEED = 8, 2, 2, 11


def read_steps(loader: TrainLoader, steps: int) -> tuple[list[list[int]], list[list[int]]]:
    positions, ids = [], []
    iterator = iter(loader)
    for _ in range(steps):
        items = [next(iterator) for _ in range(loader.accum_steps)]
        positions.append([p for item in items for p in item["position"].tolist()])
        ids.append([int(row[0]) for item in items for row in item["tokens"]])
        assert all(bool(item["valid"].all()) for item in items)
    return positions, ids


def main() -> None:
    folder, out = sys.argv[1], Path(sys.argv[2])  # the folder may be a URL
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def loader() -> TrainLoader:
        return TrainLoader(folder, global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, dp_rank=rank,
                           dp_size=world, num_workers=WORKERS, seed=SEED)

    first = loader()
    positions, ids = read_steps(first, RESUME_STEP)
    state = first.state_dict()
    states: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(states, state)
    assert all(s == state for s in states), states

    resumed = loader()
    resumed.load_state_dict(state)
    more_positions, more_ids = read_steps(resumed, STEPS - RESUME_STEP)
    out.mkdir(parents=True, exist_ok=True)
    config = {"steps": STEPS, "resume_step": RESUME_STEP, "gbs": GLOBAL_BATCH, "seed": SEED, "world": world}
    (out / f"rank{rank}.json").write_text(json.dumps({"config": config, "state": state,
                                                      "positions": positions + more_positions,
                                                      "ids": ids + more_ids}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
