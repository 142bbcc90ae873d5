"""The whole model in this process, behind the pipeline runner's interface.

The step is written once against `run(inputs, microbatches, rows, loss_fn, training)`: with one
pipeline stage this runner plays the schedule itself, micro-batch after micro-batch (forward,
loss, backward), so the training loop and validation never ask whether the model is pipelined.
Unlike a pipeline stage it can also call the model from inside a loss function (`forward`), which
is what the single-stage "reuse" step needs.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.data_parallel import set_gradient_sync
from parallel.pipeline import LossFn


class LocalRunner:
    holds_whole_model = True
    is_first = is_last = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.parts = [model]

    def forward(self, *inputs: torch.Tensor):
        """One more forward of the model, from inside a loss function: its graph joins the backward
        of the micro-batch in progress, and data parallelism still reduces each gradient once
        there (parallel/data_parallel.py, `_JoinedBackward`)."""
        return self.model(*inputs)

    def run(self, inputs: tuple[torch.Tensor, ...], microbatches: int, rows: int, loss_fn: LossFn,
            training: bool) -> None:
        """For each micro-batch m: forward rows [m * rows, (m + 1) * rows) of `inputs`, then
        loss_fn(output, m), then (training) its backward. Data-parallel gradients are reduced once,
        in the last micro-batch's backward."""
        for m in range(microbatches):
            chunk = tuple(x[m * rows:(m + 1) * rows] for x in inputs)
            if not training:
                with torch.no_grad():
                    loss_fn(self.model(*chunk), m)
                continue
            set_gradient_sync(self.model, m == microbatches - 1)
            loss_fn(self.model(*chunk), m).backward()

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # this process is the last stage
