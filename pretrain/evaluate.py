"""Evaluation: validation NELBO and corrector loss on the held-out split."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from pretrain.optim import EMA, EMAWeights
from pretrain.step import Objective, compute_losses


@torch.no_grad()
def validation_metrics(model: nn.Module, ema: EMA | None, batches: Iterable[dict], objective: Objective, step: int,
                       device: torch.device, all_reduce: Callable[[torch.Tensor], torch.Tensor],
                       autocast: torch.autocast | None = None) -> dict:
    """MDLM NELBO per token (t ~ U[sampling_eps_validation, 1], a Monte-Carlo estimate whose exp bounds
    the perplexity), the corrector loss and the corrector's error rates, with the EMA weights.

    The corrector pass runs whenever corrector training is on, also before its start step, so the
    corrector curve is defined from the first evaluation.
    """
    was_training = model.training
    model.eval()
    step = max(step, objective.cfg.corrector_training_start_step)
    sums = torch.zeros(5, device=device)  # mdlm, corrector, input errors, output errors, tokens
    with EMAWeights(model, ema):
        for batch in batches:
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            losses = compute_losses(model, batch, objective, step, "reuse", training=False, autocast=autocast)
            sums += torch.stack([losses.mdlm.sum(), losses.corrector.sum(), losses.corrector_input_errors.sum(),
                                 losses.corrector_output_errors.sum(), losses.mdlm.new_tensor(0) +
                                 batch["valid"].sum() * batch["tokens"].shape[1]])
    model.train(was_training)
    sums = all_reduce(sums)
    tokens = max(sums[4].item(), 1.0)
    nelbo = sums[0].item() / tokens
    return {"mdlm_nelbo": nelbo, "perplexity_bound": math.exp(min(nelbo, 50.0)), "corrector_nll": sums[1].item() / tokens,
            "corrector_input_error": sums[2].item() / tokens, "corrector_output_error": sums[3].item() / tokens,
            "tokens": int(tokens)}
