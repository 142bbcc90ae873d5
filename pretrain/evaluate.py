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


def sample_report(model: nn.Module, tokenizer, cfg, corpus: str, device: torch.device,
                  training_set: set[str] | None = None) -> tuple[str, list[dict]]:
    """The end-of-run table: samples at a low NFE budget without and with correction, and without
    correction at the corrected run's NFE. Returns (markdown, one dict per row)."""
    import dataclasses

    from pretrain.diffusion import NoiseSchedule
    from pretrain.sampler import Sampler

    base = cfg.sampling
    corrected = dataclasses.replace(base, corrector_steps=base.corrector_steps or 2)
    smiles = is_smiles_corpus(corpus)
    judge = None if smiles else default_judge()
    rows, examples = [], []

    def run(label: str, sampling) -> float:
        sampler = Sampler(model, sampling, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                          seq_len=cfg.model.seq_len, schedule=NoiseSchedule(cfg.diffusion),
                          time_conditioning=cfg.model.time_conditioning, device=device)
        result = sampler.sample(sampling.num_samples)
        ids = result.tokens.tolist()
        texts = [tokenizer.decode_document(t, strict=True) if smiles else tokenizer.decode(t) for t in ids]
        row = {"sampler": label, "steps": sampling.steps, "corrector_steps": sampling.corrector_steps,
               "corrector_every": sampling.corrector_every, "nfe": result.nfe_total.float().mean().item(),
               **quality_of(texts, ids, smiles, training_set, judge)}
        rows.append(row)
        examples.append((label, texts[:2]))
        return row["nfe"]

    run("MDLM (no correction)", dataclasses.replace(base, corrector_steps=0))
    nfe = run(f"ProSeCo (S={corrected.corrector_steps}, every {corrected.corrector_every})", corrected)
    # Without the cache every step costs one NFE, so T = that NFE really spends it (with the cache,
    # plain sampling stops spending once T exceeds the number of tokens to unmask).
    run("MDLM at equal NFE", dataclasses.replace(base, corrector_steps=0, steps=max(1, round(nfe)), use_cache=False))
    columns = ["sampler", "steps", "nfe"] + (["validity", "uniqueness", "novelty", "qed_mean"] if smiles else
                                             ["trigram_perplexity", "trigram_oov_rate", "unigram_entropy",
                                              "distinct_2", "repetition_rate"])
    columns = [c for c in columns if c in rows[0]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    for label, texts in examples[:2]:
        lines += ["", f"{label}:"] + [f"    {t[:300]!r}" for t in texts]
    return "\n".join(lines), rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
