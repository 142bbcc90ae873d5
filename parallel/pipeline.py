"""Pipeline parallelism: run a model's stages with torch.distributed.pipelining.

A model family builds its stages (copies of the full model with the parts a stage does not own
removed, torchtitan's way, so parameter names and checkpoints stay those of the full model); this
module places them on ranks and runs them. With `pp_virtual_stages` = v, rank r holds stages
r, r + pp, ..., r + (v-1) pp (interleaved 1F1B).

The loss is computed on the last stage from what every rank of a pipeline group can compute
itself (the same batch, the same keyed masks): the schedule's `target` is just the micro-batch
index, and the loss function looks the micro-batch up. It returns a scalar; metrics leave through
the loss function's own side channel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
)

from parallel.config import ParallelConfig
from parallel.mesh import Layout

TRAIN_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}

LossFn = Callable[[torch.Tensor, int], torch.Tensor]


def stage_ids(layout: Layout, virtual_stages: int) -> list[int]:
    """The stages this rank holds (looped: rank r holds r, r + pp, ...)."""
    return [layout.pp_rank + v * layout.pp for v in range(virtual_stages)]


class PipelineRunner:
    """Runs forward-only and training pipeline schedules over this rank's stage modules.

    Schedules are built lazily per micro-batch size (pass 1 sees b rows per micro-batch, pass 2
    the 2b rows of z_t and y), each with its own PipelineStage objects over the same modules,
    because a stage fixes its activation shapes at its first step.
    """

    holds_whole_model = False  # a loss function cannot call the model again (no reuse step)

    def __init__(self, parts: list[nn.Module], layout: Layout, mesh: DeviceMesh, cfg: ParallelConfig,
                 device: torch.device):
        self.parts, self.layout, self.cfg, self.device = parts, layout, cfg, device
        self.group = mesh["pp"].get_group()
        self.ids = stage_ids(layout, cfg.pp_virtual_stages)
        self.num_stages = cfg.num_stages
        self.is_first = 0 in self.ids
        self.is_last = self.num_stages - 1 in self.ids
        # The last stage, pp * v - 1, is held by pipeline rank pp - 1 (looped placement).
        self.last_rank = dist.get_global_rank(self.group, layout.pp - 1)
        self._schedules: dict[tuple, object] = {}
        self.loss_fn: Callable | None = None

    def _schedule(self, training: bool, rows: int, microbatches: int):
        # A stage fixes its output's shape at its first step: logits and final features differ.
        key = (training, rows, microbatches, tuple(getattr(part, "emit_features", False) for part in self.parts))
        if key not in self._schedules:
            stages = [PipelineStage(part, sid, self.num_stages, self.device, group=self.group)
                      for part, sid in zip(self.parts, self.ids)]
            loss = lambda output, target: self.loss_fn(output, target)  # noqa: E731 - set per call
            if training:
                cls = TRAIN_SCHEDULES[self.cfg.pp_schedule]
                # scale_grads=False: the loss of each micro-batch is already a share of the global mean.
                self._schedules[key] = cls(stages if len(stages) > 1 else stages[0], microbatches, loss_fn=loss,
                                           scale_grads=False)
            elif len(stages) > 1:
                self._schedules[key] = ScheduleLoopedBFS(stages, microbatches, loss_fn=loss, scale_grads=False)
            else:
                self._schedules[key] = ScheduleGPipe(stages[0], microbatches, loss_fn=loss, scale_grads=False)
        return self._schedules[key]

    def run(self, inputs: tuple[torch.Tensor, ...], microbatches: int, rows: int, loss_fn: LossFn,
            training: bool) -> None:
        """One pipeline pass over `microbatches` micro-batches of `rows` rows each.

        Stage 0 passes the whole batch (`inputs`, split along dim 0); the last stage calls
        loss_fn(output, m) for micro-batch m. training=False runs forward only, under no_grad:
        nothing is stored.
        """
        self.loss_fn = lambda output, target: loss_fn(output, int(target.reshape(-1)[0]))
        schedule = self._schedule(training, rows, microbatches)
        args = inputs if self.is_first else ()
        target = torch.arange(microbatches, device=self.device) if self.is_last else None
        if training:
            schedule.step(*args, target=target, return_outputs=False)
        else:
            with torch.no_grad():
                schedule.eval(*args, target=target, return_outputs=False)

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Send a tensor computed on the last stage (e.g. the corrector input y) to every stage."""
        dist.broadcast(tensor, src=self.last_rank, group=self.group)
        return tensor
