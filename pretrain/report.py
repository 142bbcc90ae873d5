"""The end-of-run sample report: three sampler settings on a run's final EMA weights.

`proseco train` writes it after training returns (rank 0 alone, not after a preemption):
samples at a low NFE budget without and with correction, and without correction at the
corrected sampler's NFE, as run_dir/samples.md (the table and two examples per sampler) and
run_dir/samples.jsonl (the rows). It reads the latest checkpoint, so the weights are those the
run saved whatever layout trained them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pretrain.checkpoint import load_model
from pretrain.config import RunConfig, SamplingConfig
from pretrain.files import atomic_write_text
from pretrain.sampler import Sampler
from pretrain.scoring import Scorer, build_scorer
from pretrain.sweep import markdown_table, nfe_summary
from tokenizer.tokenizers import Tokenizer


def sample_report(model: torch.nn.Module, cfg: RunConfig, tokenizer: Tokenizer, scorer: Scorer,
                  device: torch.device) -> tuple[str, list[dict]]:
    """Samples at a low NFE budget without and with correction, and without correction at the
    corrected sampler's NFE. Returns (markdown table with two examples per sampler, the rows)."""
    base = cfg.sampling
    corrected = dataclasses.replace(base, corrector_steps=base.corrector_steps or 2)
    rows, examples = [], []

    def run(label: str, sampling: SamplingConfig) -> float:
        result = Sampler.for_run(model, cfg, tokenizer, sampling, device).sample(sampling.num_samples)
        texts = scorer.texts(result.tokens)
        rows.append({"model": label, "steps": sampling.steps, "corrector_steps": sampling.corrector_steps,
                     "corrector_every": sampling.corrector_every, **nfe_summary(result),
                     **scorer.score(result.tokens, texts)})
        examples.append((label, texts[:2]))
        return rows[-1]["nfe_total"]

    run("MDLM (no correction)", dataclasses.replace(base, corrector_steps=0))
    nfe = run(f"ProSeCo (S={corrected.corrector_steps}, every {corrected.corrector_every})", corrected)
    # Without the cache every step costs one NFE, so T = that NFE really spends it (with the cache,
    # plain sampling stops spending once T exceeds the number of tokens to unmask).
    run("MDLM at equal NFE", dataclasses.replace(base, corrector_steps=0, steps=max(1, round(nfe)), use_cache=False))
    lines = [markdown_table(rows).rstrip()]
    for label, texts in examples[:2]:
        lines += ["", f"{label}:"] + [f"    {t[:300]!r}" for t in texts]
    return "\n".join(lines), rows


def write_sample_report(run_dir: Path, device: torch.device) -> str:
    """Sample from the run's latest checkpoint (EMA weights), write run_dir/samples.md and
    run_dir/samples.jsonl, print the table and return it."""
    run_dir = Path(run_dir)
    from pretrain.sft import is_sft_folder, sft_sample_report

    model, cfg, tokenizer = load_model(run_dir, device)
    if is_sft_folder(cfg.data.shards):  # an SFT run is judged by its answers to held-out prompts
        table, rows = sft_sample_report(model, cfg, tokenizer, device)
    else:
        # Novelty too: canonicalising the training molecules costs seconds at QM9's size (8 s for
        # 124k on 2 cores, cached in run_dir/cache), and without it a sampler that reproduces its
        # training set would look as good as one that invents. No warning when the trigram judge is
        # missing: the report is a glance at the run, the sweeps are the measurement.
        scorer = build_scorer(cfg, tokenizer, run_dir, log=lambda message: None)
        table, rows = sample_report(model, cfg, tokenizer, scorer, device)
    atomic_write_text(run_dir / "samples.md", table + "\n")
    atomic_write_text(run_dir / "samples.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    print("samples (EMA weights):\n" + table, flush=True)
    return table
