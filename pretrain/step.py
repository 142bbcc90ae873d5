"""One micro-batch of the ProSeCo objective: forward passes and the per-token losses.

Two ways to build the corrector input y from the model's own prediction, with the same loss and
gradients when dropout is off:

- reuse (the official code's cost, 2 forward+backward): forward z_t with grad, y = argmax of its
  detached logits, forward y with grad. Needs the whole model in one pipeline stage.
- two_pass (what pipeline parallelism runs): pass 1 forwards z_t under no_grad (it stores no
  activations), giving y; pass 2 forwards z_t and y together as one batch of 2B, with grad.
  Pass 1 costs one extra forward: 7 units of work against reuse's 6 and MDLM's 3.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pretrain.config import DiffusionConfig
from pretrain.diffusion import Losses, Noised, NoiseSchedule, add_noise, corrector_input, proseco_losses, suppress_logits


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


Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def compute_losses(model: Model, batch: dict, objective: Objective, step: int, mode: str = "reuse",
                   training: bool = True, autocast: torch.autocast | None = None) -> Losses:
    """Per-token losses of one micro-batch (sum them, divide by the global token count, backward)."""
    noised = objective.noise(batch, training)
    ctx = autocast if autocast is not None else nullcontext()

    def scores(tokens: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Logits with the mask (and tensor-parallel padding) suppressed, computed once per pass
        and shared by the argmax and the loss."""
        with ctx:
            logits = model(tokens, sigma)
        return suppress_logits(logits.float(), objective.mask_id, objective.vocab_size)

    def make_y(scores_zt: torch.Tensor) -> torch.Tensor:
        return corrector_input(scores_zt, noised, objective.cfg, objective.mask_id, objective.seed,
                               batch["position"])

    if not objective.corrector_active(step):
        return proseco_losses(scores(noised.zt, noised.sigma), None, None, noised, objective.cfg, objective.mask_id)
    if mode == "reuse":
        scores_zt = scores(noised.zt, noised.sigma)
        y = make_y(scores_zt)
        # The corrector pass sees the same sigma (zeroed anyway without time conditioning).
        scores_y = scores(y, noised.sigma)
    elif mode == "two_pass":
        with torch.no_grad():
            y = make_y(scores(noised.zt, noised.sigma))
        scores_zt, scores_y = scores(torch.cat([noised.zt, y]), torch.cat([noised.sigma, noised.sigma])).chunk(2)
    else:
        raise ValueError(f"unknown step mode {mode!r}: use reuse or two_pass")
    return proseco_losses(scores_zt, scores_y, y, noised, objective.cfg, objective.mask_id)


def pipelined_losses(runner, batches: list[dict], objective: Objective, step: int,
                     backward_scale: torch.Tensor | None, autocast: torch.autocast | None = None) -> torch.Tensor:
    """The two-pass step across pipeline stages, over all micro-batches of a step at once.

    Pass 1 is a forward-only pipeline pass on z_t (no grad, nothing stored) whose last stage takes
    y = argmax (vocabulary-parallel under tensor parallelism); y goes to every stage. Pass 2 runs
    the training schedule on the micro-batches [z_t; y] with the joint loss on the last stage,
    scaled by `backward_scale` for backward (None: evaluation, forward only). Every stage computes
    the masks itself (keyed randomness), so only y and activations travel. Returns the sums
    (loss, mdlm, corrector, input errors, output errors) on the last stage, zeros elsewhere.
    """
    training = backward_scale is not None
    noised = [objective.noise(batch, training) for batch in batches]
    rows, count = batches[0]["tokens"].shape[0], len(batches)
    device = noised[0].zt.device
    terms: dict[int, torch.Tensor] = {}  # per micro-batch: a schedule's first step may call the loss
    corrector = objective.corrector_active(step)  # once more, on shape-inference output; the last call counts
    ctx = autocast if autocast is not None else nullcontext()

    def scores_of(output: torch.Tensor) -> torch.Tensor:
        return suppress_logits(output.float(), objective.mask_id, objective.vocab_size)

    ys: list[torch.Tensor | None] = [None] * count
    if corrector:
        def first_pass(output: torch.Tensor, m: int) -> torch.Tensor:
            ys[m] = corrector_input(scores_of(output), noised[m], objective.cfg, objective.mask_id, objective.seed,
                                    batches[m]["position"])
            return torch.zeros((), device=device)

        with ctx:
            runner.run(torch.cat([n.zt for n in noised]), torch.cat([n.sigma for n in noised]), count, rows,
                       first_pass, training=False)
        y = torch.cat(ys) if runner.is_last else torch.empty_like(torch.cat([n.zt for n in noised]))
        ys = list(runner.broadcast_from_last(y).split(rows))
        tokens = torch.cat([torch.cat([n.zt, y_m]) for n, y_m in zip(noised, ys)])
        sigma = torch.cat([torch.cat([n.sigma, n.sigma]) for n in noised])
    else:
        tokens, sigma = torch.cat([n.zt for n in noised]), torch.cat([n.sigma for n in noised])

    def second_pass(output: torch.Tensor, m: int) -> torch.Tensor:
        scores = scores_of(output)
        if corrector:
            scores_zt, scores_y = scores.chunk(2)
            losses = proseco_losses(scores_zt, scores_y, ys[m], noised[m], objective.cfg, objective.mask_id)
        else:
            losses = proseco_losses(scores, None, None, noised[m], objective.cfg, objective.mask_id)
        terms[m] = torch.stack([t.detach().sum() for t in (losses.total, losses.mdlm, losses.corrector,
                                                           losses.corrector_input_errors, losses.corrector_output_errors)])
        total = losses.total.sum()
        return total * backward_scale if training else total.detach()

    with ctx:
        runner.run(tokens, sigma, count, rows * (2 if corrector else 1), second_pass, training)
    return sum(terms.values()) if terms else torch.zeros(5, device=device)
