"""The ProSeCo objective over the micro-batches of one step, through a runner.

One code path for every layout: `forward_backward` talks to a runner with the pipeline runner's
interface (parallel/runner.py for the whole model in this process, parallel/pipeline.py for
pipeline stages), so the training loop and validation never branch on the layout. Two ways to
build the corrector input y from the model's own prediction, with the same loss and gradients
when dropout is off:

- reuse (the official code's cost, 2 forward+backward): forward z_t with grad, y = argmax of its
  detached logits, forward y with grad. Needs the whole model in one process (runner.forward).
- two_pass (what pipeline parallelism runs): pass 1 forwards z_t under no_grad (it stores no
  activations), giving y; pass 2 forwards z_t and y together as one batch of 2B, with grad.
  Pass 1 costs one extra forward: 7 units of work against reuse's 6 and MDLM's 3.

Every rank computes the masks itself (keyed randomness), so only y and activations travel.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch

from pretrain.config import DiffusionConfig
from pretrain.diffusion import (
    Losses,
    Noised,
    NoiseSchedule,
    add_noise,
    corrector_input,
    proseco_losses,
    suppress_logits,
)


@dataclass
class Objective:
    """Everything the step needs besides the model and the batch."""

    cfg: DiffusionConfig
    mask_id: int
    vocab_size: int  # real vocabulary (rows past it, padding for tensor parallelism, are never predicted)
    seed: int
    global_batch_size: int
    schedule: NoiseSchedule

    @classmethod
    def build(cls, cfg: DiffusionConfig, *, mask_id: int, vocab_size: int, seed: int, global_batch_size: int):
        return cls(cfg, mask_id, vocab_size, seed, global_batch_size, NoiseSchedule(cfg))

    def corrector_active(self, step: int) -> bool:
        return self.cfg.corrector_training and step >= self.cfg.corrector_training_start_step

    def noise(self, batch: dict, training: bool) -> Noised:
        eps = self.cfg.sampling_eps_training if training else self.cfg.sampling_eps_validation
        return add_noise(batch["tokens"], batch["position"], batch["valid"], cfg=self.cfg, schedule=self.schedule,
                         mask_id=self.mask_id, seed=self.seed, global_batch_size=self.global_batch_size, eps=eps)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits with the mask (and tensor-parallel padding) suppressed, computed once per
        pass and shared by the argmax and the loss."""
        return suppress_logits(logits.float(), self.mask_id, self.vocab_size)

    def corrector_input(self, scores_zt: torch.Tensor, noised: Noised, positions: torch.Tensor) -> torch.Tensor:
        return corrector_input(scores_zt, noised, self.cfg, self.mask_id, self.seed, positions)

    def losses(self, scores_zt: torch.Tensor, scores_y: torch.Tensor | None, y: torch.Tensor | None,
               noised: Noised) -> Losses:
        return proseco_losses(scores_zt, scores_y, y, noised, self.cfg, self.mask_id)


@dataclass
class StepMetrics:
    """Sums over the tokens of some micro-batches (0-d tensors; divide by `tokens` for means)."""

    loss: torch.Tensor
    mdlm: torch.Tensor
    corrector: torch.Tensor
    input_errors: torch.Tensor   # corrector inputs y that differ from x0
    output_errors: torch.Tensor  # corrector argmaxes that differ from x0
    tokens: torch.Tensor         # tokens that count (valid samples x sequence length)

    @classmethod
    def zeros(cls, device: torch.device | str) -> StepMetrics:
        return cls.from_tensor(torch.zeros(len(fields(cls)), device=device))

    @classmethod
    def of(cls, losses: Losses, token_mask: torch.Tensor) -> StepMetrics:
        terms = (losses.total, losses.mdlm, losses.corrector, losses.corrector_input_errors,
                 losses.corrector_output_errors, token_mask)
        return cls(*(t.detach().sum() for t in terms))

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> StepMetrics:
        return cls(*values.unbind())

    def as_tensor(self) -> torch.Tensor:
        return torch.stack([getattr(self, f.name) for f in fields(self)])

    def __add__(self, other: StepMetrics) -> StepMetrics:
        return StepMetrics(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def per_token(self, tokens: torch.Tensor) -> dict[str, float]:
        """The training record: each sum divided by `tokens` (fp32, as the loss itself)."""
        means = self.as_tensor()[:-1] / tokens
        names = ("loss", "mdlm_nelbo", "corrector_nll", "corrector_input_error", "corrector_output_error")
        return dict(zip(names, means.tolist()))

    def reduced(self, all_reduce) -> StepMetrics:
        """Summed over ranks by `all_reduce` (one collective for every field)."""
        return StepMetrics.from_tensor(all_reduce(self.as_tensor()))


def forward_backward(runner, batches: list[dict], objective: Objective, step: int, mode: str = "reuse",
                     backward_scale: torch.Tensor | float | None = None,
                     autocast: torch.autocast | None = None) -> StepMetrics:
    """The objective over this rank's micro-batches `batches`, through `runner`.

    With `backward_scale` each micro-batch's summed loss, times the scale, is backpropagated
    (training); None runs forward only (validation: call under no_grad). Returns the metric sums
    of all micro-batches, the same on every stage of a pipeline.
    """
    training = backward_scale is not None
    noised = [objective.noise(batch, training) for batch in batches]
    positions = [batch["position"] for batch in batches]
    rows, count = batches[0]["tokens"].shape[0], len(batches)
    device = noised[0].zt.device
    # Per micro-batch: a pipeline schedule's first step may call the loss once more, on
    # shape-inference output; the last call counts.
    metrics: dict[int, StepMetrics] = {}

    def finish(m: int, losses: Losses) -> torch.Tensor:
        metrics[m] = StepMetrics.of(losses, noised[m].token_mask)
        total = losses.total.sum()
        return total * backward_scale if training else total.detach()

    zt, sigma = torch.cat([n.zt for n in noised]), torch.cat([n.sigma for n in noised])
    with autocast if autocast is not None else nullcontext():
        if not objective.corrector_active(step):
            def plain(output: torch.Tensor, m: int) -> torch.Tensor:
                return finish(m, objective.losses(objective.scores(output), None, None, noised[m]))

            runner.run((zt, sigma), count, rows, plain, training)
        elif mode == "reuse":
            def reuse(output: torch.Tensor, m: int) -> torch.Tensor:
                scores_zt = objective.scores(output)
                y = objective.corrector_input(scores_zt, noised[m], positions[m])
                # The corrector pass sees the same sigma (zeroed anyway without time conditioning).
                scores_y = objective.scores(runner.forward(y, noised[m].sigma))
                return finish(m, objective.losses(scores_zt, scores_y, y, noised[m]))

            runner.run((zt, sigma), count, rows, reuse, training)
        elif mode == "two_pass":
            _two_pass(runner, noised, positions, objective, finish, training)
        else:
            raise ValueError(f"unknown step mode {mode!r}: use reuse or two_pass")
    total = StepMetrics.zeros(device)
    for value in metrics.values():
        total = total + value
    return StepMetrics.from_tensor(runner.broadcast_from_last(total.as_tensor()))


def _two_pass(runner, noised: list[Noised], positions: list[torch.Tensor], objective: Objective, finish,
              training: bool) -> None:
    """Pass 1, forward only on z_t, takes y on the last stage (vocabulary-parallel argmax under
    tensor parallelism) and sends it to every stage; pass 2 runs the micro-batches [z_t; y] with
    the joint loss."""
    rows, count = noised[0].zt.shape[0], len(noised)
    zt = torch.cat([n.zt for n in noised])
    ys: list[torch.Tensor | None] = [None] * count

    def first_pass(output: torch.Tensor, m: int) -> torch.Tensor:
        ys[m] = objective.corrector_input(objective.scores(output), noised[m], positions[m])
        return torch.zeros((), device=output.device)

    runner.run((zt, torch.cat([n.sigma for n in noised])), count, rows, first_pass, training=False)
    y = torch.cat(ys) if runner.is_last else torch.empty_like(zt)
    ys = list(runner.broadcast_from_last(y).split(rows))
    tokens = torch.cat([torch.cat([n.zt, y_m]) for n, y_m in zip(noised, ys)])
    sigma = torch.cat([torch.cat([n.sigma, n.sigma]) for n in noised])

    def second_pass(output: torch.Tensor, m: int) -> torch.Tensor:
        scores_zt, scores_y = objective.scores(output).chunk(2)
        return finish(m, objective.losses(scores_zt, scores_y, ys[m], noised[m]))

    runner.run((tokens, sigma), count, 2 * rows, second_pass, training)
