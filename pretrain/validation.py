"""Validation: the MDLM NELBO and the corrector loss on a held-out split, in the training loop
(`validation_metrics`) and for a saved checkpoint (`evaluate_checkpoint`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from parallel.runner import LocalRunner
from pretrain.optim import EMA, EMAWeights
from pretrain.step import Objective, StepMetrics, forward_backward


@torch.no_grad()
def validation_metrics(runner, ema: EMA | None, batches: Iterable[dict], objective: Objective, step: int,
                       device: torch.device, all_reduce: Callable[[torch.Tensor], torch.Tensor],
                       autocast: torch.autocast | None = None) -> dict:
    """MDLM NELBO per token (t ~ U[sampling_eps_validation, 1], a Monte-Carlo estimate whose exp bounds
    the perplexity), the corrector loss and the corrector's error rates, with the EMA weights.

    `runner` holds the model (or this rank's pipeline stages). The corrector pass runs whenever
    corrector training is on, also before its start step, so the corrector curve is defined from
    the first evaluation.
    """
    was_training = runner.parts[0].training
    for part in runner.parts:
        part.eval()
    step = max(step, objective.cfg.corrector_training_start_step)
    mode = "reuse" if runner.holds_whole_model else "two_pass"
    sums = StepMetrics.zeros(device)
    with EMAWeights(ema):
        for batch in batches:
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            sums = sums + forward_backward(runner, [batch], objective, step, mode, autocast=autocast)
    for part in runner.parts:
        part.train(was_training)
    sums = sums.reduced(all_reduce)
    tokens = max(sums.tokens.item(), 1.0)
    nelbo = sums.mdlm.item() / tokens
    return {"mdlm_nelbo": nelbo, "perplexity_bound": math.exp(min(nelbo, 50.0)),
            "corrector_nll": sums.corrector.item() / tokens, "corrector_input_error": sums.input_errors.item() / tokens,
            "corrector_output_error": sums.output_errors.item() / tokens, "tokens": int(tokens)}


def evaluate_checkpoint(checkpoint: str | Path, *, split: str = "val", batches: int | None = None,
                        shards: str | Path | None = None, device: str | torch.device = "cpu",
                        corrector: bool = True, log: Callable[[str], None] = lambda message: None) -> dict:
    """Validation MDLM NELBO (t ~ U[sampling_eps_validation, 1], Monte-Carlo; exp bounds the
    perplexity) and corrector loss/error rates of a checkpoint's EMA weights on a split.

    `batches` counts batches of the run's data.global_batch_size samples, as train.eval_batches
    (None: the whole split); `log` hears what is about to be evaluated. With `corrector` the
    corrector pass is evaluated also for a model trained with the MDLM loss alone: how well a
    plain MDLM model repairs its own argmax is the control the claim needs.
    """
    from pretrain.checkpoint import load_model, read_meta, resolve_checkpoint
    from pretrain.data import eval_batches, read_options

    device = torch.device(device)
    path = resolve_checkpoint(checkpoint)
    model, cfg, tokenizer = load_model(path, device)
    diffusion = dataclasses.replace(cfg.diffusion, corrector_training=True) if corrector else cfg.diffusion
    objective = Objective.build(diffusion, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                                seed=cfg.train.seed, global_batch_size=cfg.data.global_batch_size,
                                num_classes=getattr(cfg.model, "num_classes", None) or 0)
    loader = eval_batches(shards or cfg.data.shards, split, micro_batch_size=cfg.data.micro_batch_size,
                          max_samples=batches * cfg.data.global_batch_size if batches else None,
                          expected_tokenizer_sha256=tokenizer.sha256, labels=cfg.data.labels, **read_options(cfg.data))
    step = int(read_meta(path)["step"])
    log(f"evaluating {path} (step {step}) on {split}: {len(loader)} batches of {cfg.data.micro_batch_size} ...")
    # load_model already holds the EMA weights, so no EMA is swapped in here.
    metrics = validation_metrics(LocalRunner(model), None, loader, objective, step, device, lambda t: t)
    return {"model": cfg.name, "checkpoint": str(path), "train_step": step, "split": split,
            "trained_with_corrector": cfg.diffusion.corrector_training, **metrics}
