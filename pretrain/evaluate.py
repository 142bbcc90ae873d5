"""Evaluation: validation NELBO and corrector loss on the held-out split."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from pretrain.optim import EMA, EMAWeights
from pretrain.step import Objective, compute_losses, pipelined_losses


@torch.no_grad()
def validation_metrics(model: nn.Module | list[nn.Module], ema: EMA | None, batches: Iterable[dict],
                       objective: Objective, step: int, device: torch.device,
                       all_reduce: Callable[[torch.Tensor], torch.Tensor], autocast: torch.autocast | None = None,
                       runner=None) -> dict:
    """MDLM NELBO per token (t ~ U[sampling_eps_validation, 1], a Monte-Carlo estimate whose exp bounds
    the perplexity), the corrector loss and the corrector's error rates, with the EMA weights.

    `model` is the model, or the pipeline stages of this rank with their `runner`. The corrector
    pass runs whenever corrector training is on, also before its start step, so the corrector
    curve is defined from the first evaluation.
    """
    parts = model if isinstance(model, list) else [model]
    was_training = parts[0].training
    for part in parts:
        part.eval()
    step = max(step, objective.cfg.corrector_training_start_step)
    sums = torch.zeros(5, device=device)  # mdlm, corrector, input errors, output errors, tokens
    with EMAWeights(ema):
        for batch in batches:
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            tokens = batch["valid"].sum() * batch["tokens"].shape[1]
            if runner is not None:
                terms = runner.broadcast_from_last(pipelined_losses(runner, [batch], objective, step, None, autocast))[1:]
            else:
                losses = compute_losses(parts[0], batch, objective, step, "reuse", training=False, autocast=autocast)
                terms = torch.stack([losses.mdlm.sum(), losses.corrector.sum(), losses.corrector_input_errors.sum(),
                                     losses.corrector_output_errors.sum()])
            sums += torch.cat([terms, tokens.reshape(1).to(terms.dtype)])
    for part in parts:
        part.train(was_training)
    sums = all_reduce(sums)
    tokens = max(sums[4].item(), 1.0)
    nelbo = sums[0].item() / tokens
    return {"mdlm_nelbo": nelbo, "perplexity_bound": math.exp(min(nelbo, 50.0)), "corrector_nll": sums[1].item() / tokens,
            "corrector_input_error": sums[2].item() / tokens, "corrector_output_error": sums[3].item() / tokens,
            "tokens": int(tokens)}


# ---------------------------------------------------------------------------------------------
# Sample quality


def is_smiles_corpus(corpus: str) -> bool:
    return "moses" in corpus.lower() or "smiles" in corpus.lower()


def quality_of(texts: list[str], token_ids: list[list[int]], smiles: bool, training_set: set[str] | None = None,
               judge=None) -> dict:
    """Task metrics of one set of decoded samples: RDKit for SMILES, n-gram statistics for text."""
    from pretrain import quality

    if smiles:
        return quality.smiles_metrics(texts, training_set, with_properties=True)
    return quality.text_metrics(texts, token_ids=token_ids, judge=judge)


def default_judge():
    """The CMU trigram judge when pocketsphinx is installed (the eval extra), else None."""
    try:
        from pretrain.quality import TrigramJudge

        return TrigramJudge()
    except (ImportError, FileNotFoundError):  # the eval extra is not installed
        return None
