"""E2, prompted block decoding on QM9: the analogue of the paper's LLaDA evaluation.

    python -m experiments.qm9_prompted --model A@18000=runs/e1/mdlm --model B@14000=runs/e1/proseco \
        --baseline A@18000 --candidate B@14000 --out runs/e2

Each held-out (validation) molecule is cut after its first PROMPT_CHARS characters; every model
completes the prompts in semi-autoregressive blocks with greedy low-confidence decoding
(sampling.block_length, temperature 0, early-EOS stop: LLaDA's harness). The grid: unmasking steps
T (T = the generated positions is one token per step, the baseline's best), and for ProSeCo models
corrector loops of S iterations every omega steps. Scored per setting: validity of the completed
molecule, exact recovery (its canonical SMILES equals the held-out molecule's), novelty (valid
completions absent from the training set), uniqueness, and the mean NFEs.

Verdict (fixed before the run, issue 17): reproduced if some candidate setting comes within 2
points (0.02) of the baseline's one-token-per-step validity and exact recovery at no more than half
its mean NFE. Writes OUT/sweep.csv (every number), OUT/prompted.md (the table and the verdict)
and OUT/prompted.png (each metric against mean NFE).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from pretrain import quality
from pretrain.checkpoint import load_model, resolve_checkpoint
from pretrain.files import atomic_write_text
from pretrain.sampler import Sampler, SampleResult
from pretrain.scoring import build_scorer, reference_rows
from pretrain.sweep import GridPoint, make_grid, nfe_summary, plot_sweep, run_folder, write_table

MATCH_POINTS = 0.02
COLUMNS = ("validity", "exact_recovery", "novelty", "uniqueness")


def held_out_molecules(shards: str | Path, tokenizer, count: int, min_chars: int) -> list[str]:
    """The first `count` readable validation molecules with more than `min_chars` characters."""
    rows = reference_rows(shards, "val", limit=4 * count + 64)
    molecules = [tokenizer.decode_document(row, strict=True) for row in rows.tolist()]
    kept = [m for m in molecules if len(m) > min_chars]
    if len(kept) < count:
        raise ValueError(f"only {len(kept)} held-out molecules longer than {min_chars} characters; ask for fewer")
    return kept[:count]


def prompts(tokenizer, molecules: list[str], prompt_chars: int) -> torch.Tensor:
    """[N, 1 + prompt_chars]: BOS and the first characters of each molecule."""
    rows = [[tokenizer.bos_id, *tokenizer.encode(m[:prompt_chars])] for m in molecules]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("prompts must have one length in tokens: use a character tokenizer (QM9's)")
    return torch.tensor(rows)


def score(texts: list[str], molecules: list[str], training_set: set[str] | None) -> dict:
    """Validity, uniqueness and novelty of the completed molecules, and the share that recovers
    its held-out molecule exactly (same canonical SMILES)."""
    metrics = quality.smiles_metrics(texts, training_set, with_properties=False)
    completed = [quality.canonical_smiles(t) for t in texts]
    recovered = sum(c is not None and c == quality.canonical_smiles(m) for c, m in zip(completed, molecules))
    metrics["exact_recovery"] = recovered / len(texts)
    return metrics


def run_model(label: str, checkpoint: str, points: list[GridPoint], molecules: list[str], prompt_chars: int,
              block_length: int, batch_size: int, seed: int) -> list[dict]:
    path = resolve_checkpoint(checkpoint)
    model, cfg, tokenizer = load_model(path, torch.device("cpu"))
    scorer = build_scorer(cfg, tokenizer, run_folder(path))
    prompt = prompts(tokenizer, molecules, prompt_chars)
    rows = []
    for point in points:
        sampling = dataclasses.replace(cfg.sampling, steps=point.steps, corrector_steps=point.corrector_steps,
                                       corrector_every=point.corrector_every, block_length=block_length,
                                       temperature=0.0, early_eos_stop=True, seed=seed,
                                       batch_size=batch_size, num_samples=len(molecules))
        sampler = Sampler.for_run(model, cfg, tokenizer, sampling, torch.device("cpu"))
        started = time.perf_counter()
        # The sampler takes one prompt row per sample of a batch: batches of the prompts in turn.
        parts = [sampler.sample(len(part), prompt=part, seed=seed + first)
                 for first, part in ((f, prompt[f:f + batch_size]) for f in range(0, len(prompt), batch_size))]
        result = SampleResult(*(torch.cat([getattr(r, name) for r in parts])
                                for name in ("tokens", "nfe_denoiser", "nfe_corrector")))
        texts = scorer.texts(result.tokens)
        row = {"model": label, **dataclasses.asdict(point), "block_length": block_length,
               "prompt_chars": prompt_chars, "num_samples": len(molecules), **nfe_summary(result),
               "seconds": time.perf_counter() - started, "checkpoint": str(path),
               **score(texts, molecules, scorer.training_set)}
        rows.append(row)
        print(f"{label} T={point.steps} S={point.corrector_steps} omega={point.corrector_every}: NFE "
              f"{row['nfe_total']:.1f}, " + ", ".join(f"{c} {row[c]:.3f}" for c in COLUMNS), flush=True)
    return rows


def verdict(rows: list[dict], baseline: str, candidate: str, generated: int) -> dict:
    """The baseline's one-token-per-step row and the candidate's cheapest setting matching it."""
    reference = [r for r in rows if r["model"] == baseline and r["steps"] == generated and r["corrector_steps"] == 0]
    if not reference:
        raise ValueError(f"no {baseline} row at T={generated} (one token per step) with S=0")
    reference = reference[0]
    matching = [r for r in rows if r["model"] == candidate
                and all(r[c] >= reference[c] - MATCH_POINTS for c in ("validity", "exact_recovery"))]
    match = min(matching, key=lambda r: r["nfe_total"]) if matching else None
    ratio = reference["nfe_total"] / match["nfe_total"] if match else None
    return {"reference": reference, "match": match, "nfe_ratio": ratio,
            "reproduced": ratio is not None and ratio >= 2.0}


def _describe(row: dict) -> str:
    return (f"{row['model']} T={row['steps']} S={row['corrector_steps']} omega={row['corrector_every']} "
            f"(NFE {row['nfe_total']:.1f}, validity {row['validity']:.3f}, exact {row['exact_recovery']:.3f})")


def markdown(rows: list[dict], result: dict, baseline: str, candidate: str) -> str:
    lines = ["| model | T | S | omega | NFE total | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (5 + len(COLUMNS))]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['corrector_steps']} | {r['corrector_every']} | "
                     f"{r['nfe_total']:.2f} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |")
    verdict_lines = [f"- baseline, one token per step: {_describe(result['reference'])}"]
    if result["match"] is None:
        verdict_lines.append(f"- no {candidate} setting within {MATCH_POINTS:.2f} on validity and exact recovery")
    else:
        verdict_lines.append(f"- cheapest matching {candidate} setting: {_describe(result['match'])}, "
                             f"{result['nfe_ratio']:.2f}x fewer NFEs")
    verdict_lines.append(f"- **reproduced: {'yes' if result['reproduced'] else 'no'}** (needs >= 2x)")
    return (f"# E2: prompted block decoding on QM9 ({baseline} against {candidate})\n\n## Verdict\n\n"
            + "\n".join(verdict_lines) + "\n\n## Every setting\n\n" + "\n".join(lines) + "\n")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="LABEL=CHECKPOINT (a run or checkpoint folder)")
    parser.add_argument("--baseline", required=True, help="label of the plain model (one token per step is its bar)")
    parser.add_argument("--candidate", required=True, help="label of the ProSeCo model")
    parser.add_argument("--num-molecules", type=int, default=1024)
    parser.add_argument("--prompt-chars", type=int, default=3)
    parser.add_argument("--block-length", type=int, default=4)
    parser.add_argument("--steps", type=_ints, help="unmasking steps T (default: the generated positions, 1/2, 1/4)")
    parser.add_argument("--corrector-steps", type=_ints, default=[1, 2, 4])
    parser.add_argument("--corrector-every", type=_ints, default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    models = dict(spec.split("=", 1) for spec in args.model)
    for label in (args.baseline, args.candidate):
        if label not in models:
            parser.error(f"--baseline/--candidate {label!r} is not a --model label ({', '.join(models)})")
    _, cfg, tokenizer = load_model(resolve_checkpoint(models[args.baseline]), torch.device("cpu"))
    generated = cfg.model.seq_len - 1 - args.prompt_chars
    steps = args.steps or [generated, generated // 2, generated // 4]
    molecules = held_out_molecules(cfg.data.shards, tokenizer, args.num_molecules, args.prompt_chars)
    rows = []
    for label, checkpoint in models.items():
        plain = make_grid(steps, [0], [1])
        corrected = make_grid(steps, args.corrector_steps, args.corrector_every) if label == args.candidate else []
        rows += run_model(label, checkpoint, plain + [p for p in corrected if p.corrector_steps],
                          molecules, args.prompt_chars, args.block_length, args.batch_size, args.seed)
    out = Path(args.out)
    write_table(rows, out)
    result = verdict(rows, args.baseline, args.candidate, generated)
    atomic_write_text(out / "prompted.md", markdown(rows, result, args.baseline, args.candidate))
    plot_sweep(rows, out / "prompted.png", title="E2: prompted block decoding on QM9", columns=COLUMNS)
    print((out / "prompted.md").read_text())


if __name__ == "__main__":
    main()
