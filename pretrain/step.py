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
