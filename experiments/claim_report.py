"""The claim's comparisons from a finished experiment (experiments/run_claim.sh report).

    python -m experiments.claim_report --corpus moses --runs runs/claim --out runs/claim/claim-moses.md

Reads runs/claim/{CORPUS}-mdlm and -proseco (config, metrics, wall time), their validation metrics
(eval-NAME.json) and a merged sweep (default sweep-CORPUS/sweep.csv), and writes:

- the training cost of each run: parameters, steps, tokens, wall time, FLOPs (the trainer's own
  accounting: 3 forward-equivalents per sequence for MDLM, 6 for ProSeCo's reuse step);
- the speed-up claim: the MDLM model's best quality with its own plain sampler (S = 0), and the
  fewest mean NFEs at which any ProSeCo setting matches it;
- the equal-NFE claim: every ProSeCo row against the MDLM S = 0 curve interpolated (in log NFE) at
  the same NFE, with uniqueness and novelty (or entropy and repetition) next to the main metric,
  and, for a proportion such as validity, how many wins exceed two standard errors.

Every ProSeCo model of the sweep gets both comparisons: the full run ({CORPUS}-proseco) and any
earlier checkpoint of it swept under the label {CORPUS}-proseco@STEP (at half the steps it has
the MDLM run's training FLOPs: the equal-FLOPs comparison).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import yaml

from pretrain.config import load_config_dict
from pretrain.metrics import read_metrics
from pretrain.models import ModelShape, get_family
from pretrain.sweep import read_rows

# The headline metric per corpus and whether larger is better; the guards are printed beside it.
HEADLINE = {"moses": ("validity", True, ("uniqueness", "novelty", "vun")),
            "shakespeare": ("trigram_perplexity", False, ("trigram_oov_rate", "unigram_entropy", "distinct_2",
                                                          "repetition_rate"))}


def training_cost(run_dir: Path) -> dict:
    """Parameters-free cost summary of one run from its resolved config and metrics."""
    cfg = load_config_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    shape = ModelShape(vocab_size=cfg.model.vocab_size, seq_len=cfg.model.seq_len)
    forward = get_family(cfg.model.family).forward_flops(cfg.model, shape)
    per_step = (6 if cfg.diffusion.corrector_training else 3) * forward * cfg.data.global_batch_size
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    steps = train[-1]["step"] if train else 0
    seconds_file = run_dir.parent / f"{run_dir.name}.seconds"
    seconds = sum(int(x) for x in seconds_file.read_text().split()) if seconds_file.is_file() else math.nan
    return {"run": run_dir.name, "objective": "ProSeCo" if cfg.diffusion.corrector_training else "MDLM",
            "steps": steps, "tokens": train[-1]["tokens_seen"] if train else 0, "wall_minutes": seconds / 60,
            "pflops": per_step * steps / 1e15, "final_train_nelbo": train[-1]["mdlm_nelbo"] if train else math.nan,
            "final_val_nelbo": val[-1]["mdlm_nelbo"] if val else math.nan}


def interpolate(curve: list[dict], metric: str, nfe: float) -> float:
    """The curve's metric at `nfe`, linear in log2 NFE between its points; nan outside its range."""
    xs = np.log2([r["nfe_total"] for r in curve])
    ys = np.array([r.get(metric, math.nan) for r in curve], dtype=float)
    x = math.log2(nfe)
    if x < xs.min() - 1e-9 or x > xs.max() + 1e-9:
        return math.nan
    return float(np.interp(x, xs, ys))


def _f(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _ratio(baseline_nfe: float, proseco_nfe: float) -> str:
    if math.isclose(proseco_nfe, baseline_nfe):
        return "as many NFEs as the baseline"
    if proseco_nfe < baseline_nfe:
        return f"{baseline_nfe / proseco_nfe:.2f}x fewer NFEs than the baseline"
    return f"{proseco_nfe / baseline_nfe:.2f}x more NFEs than the baseline"


def _variant_step(name: str) -> int | None:
    """STEP of a label NAME@STEP (an earlier checkpoint of a run), else None."""
    return int(name.rsplit("@", 1)[1]) if "@" in name else None


def _z(a: float, b: float, n_a: int, n_b: int) -> float:
    """Two-proportion z statistic of a - b (nan when both are 0 or 1)."""
    se = math.sqrt(a * (1 - a) / n_a + b * (1 - b) / n_b)
    return (a - b) / se if se > 0 else math.nan


def _cost_row(name: str, cost: dict, ev: dict) -> str:
    return (f"| {name} | {cost['objective']} | {cost['steps']} | {cost['tokens']:,} | {_f(cost['wall_minutes'], 1)} | "
            f"{_f(cost['pflops'], 3)} | {_f(cost['final_val_nelbo'])} | {_f(ev.get('mdlm_nelbo', math.nan))} | "
            f"{_f(ev.get('corrector_nll', math.nan))} | {_f(ev.get('corrector_output_error', math.nan))} |")


def _training_table(corpus: str, runs: Path, variants: list[str]) -> list[str]:
    lines = ["## Training", "",
             "| run | objective | steps | tokens | wall min | PFLOPs | val NELBO (train log) | val NELBO (eval) | "
             "corrector loss | corrector output error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in (f"{corpus}-mdlm", f"{corpus}-proseco"):
        ev_path = runs / f"eval-{name}.json"
        ev = json.loads(ev_path.read_text()) if ev_path.is_file() else {}
        lines.append(_cost_row(name, training_cost(runs / name), ev))
    full = training_cost(runs / f"{corpus}-proseco")
    for name in variants:
        step = _variant_step(name)
        if step is None:
            continue
        # An earlier checkpoint of the ProSeCo run: its share of the run's FLOPs and tokens.
        share = step / full["steps"]
        cost = {**full, "steps": step, "tokens": int(full["tokens"] * share), "wall_minutes": math.nan,
                "pflops": full["pflops"] * share, "final_val_nelbo": math.nan}
        lines.append(_cost_row(name, cost, {}))
    return lines


def _compare(name: str, proseco: list[dict], baseline: list[dict], best: dict, corpus: str) -> list[str]:
    """Both comparisons of one ProSeCo model against the MDLM S = 0 curve."""
    metric, higher, guards = HEADLINE[corpus]
    better = (lambda a, b: a >= b) if higher else (lambda a, b: a <= b)
    proportion = metric == "validity"
    lines = [f"### {name}", ""]
    matching = sorted((r for r in proseco if better(r.get(metric, math.nan), best[metric])),
                      key=lambda r: r["nfe_total"])
    if matching:
        first = matching[0]
        lines.append(f"Fewest NFEs at which a setting of this model matches the MDLM best: {_f(first['nfe_total'], 1)} "
                     f"(T = {first['steps']}, S = {first['corrector_steps']}, omega = {first['corrector_every']}; "
                     f"{metric} {_f(first[metric])}): " + _ratio(best["nfe_total"], first["nfe_total"]) + ".")
    else:
        lines.append("No setting of this model in the grid matches the MDLM best.")
    z_note = "; z is the two-proportion z statistic of the difference" if proportion else ""
    lines += ["", f"Each row against the MDLM model's S = 0 curve interpolated in log NFE ({metric}; nan where the "
              f"NFE lies outside the curve's range){z_note}.", "",
              f"| T | S | omega | NFE | ProSeCo {metric} | MDLM {metric} at equal NFE | "
              + ("z | " if proportion else "") + " | ".join(f"ProSeCo {g} | MDLM {g}" for g in guards) + " |",
              "|" + "---|" * (6 + proportion + 2 * len(guards))]
    wins = significant = comparable = 0
    for r in sorted(proseco, key=lambda r: (r["corrector_steps"], r["corrector_every"], r["steps"])):
        reference = interpolate(baseline, metric, r["nfe_total"])
        z = _z(r[metric], reference, r["n_samples"], r["n_samples"]) if proportion else math.nan
        if not math.isnan(reference):
            comparable += 1
            wins += better(r[metric], reference) and r[metric] != reference
            significant += proportion and z > 2
        guard_cells = " | ".join(f"{_f(r.get(g, math.nan))} | {_f(interpolate(baseline, g, r['nfe_total']))}"
                                 for g in guards)
        lines.append(f"| {r['steps']} | {r['corrector_steps']} | {r['corrector_every']} | {_f(r['nfe_total'], 1)} | "
                     f"{_f(r[metric])} | {_f(reference)} | " + (f"{_f(z, 1)} | " if proportion else "")
                     + f"{guard_cells} |")
    lines += ["", f"Rows strictly better than MDLM at equal NFE: {wins} of {comparable} comparable rows"
              + (f"; by more than two standard errors: {significant}." if proportion else ".")]
    return lines


def report(corpus: str, runs: Path, sweep_csv: Path | None = None) -> str:
    metric, higher, _ = HEADLINE[corpus]
    sweep_csv = sweep_csv or runs / f"sweep-{corpus}" / "sweep.csv"
    rows = read_rows(sweep_csv)
    mdlm_name = f"{corpus}-mdlm"
    variants = sorted({r["model"] for r in rows if r["model"].startswith(f"{corpus}-proseco")},
                      key=lambda name: (_variant_step(name) is None, _variant_step(name) or 0))
    nucleus = ", ".join(_f(p, 2) for p in sorted({r.get("nucleus_p", math.nan) for r in rows}))
    lines = [f"# Claim check: {corpus}", "", f"Sweep: `{sweep_csv}` (nucleus p: {nucleus})", ""]
    lines += _training_table(corpus, runs, variants)
    baseline = sorted((r for r in rows if r["model"] == mdlm_name and r["corrector_steps"] == 0),
                      key=lambda r: r["nfe_total"])
    valid = [r for r in baseline if not math.isnan(r.get(metric, math.nan))]
    best = (max if higher else min)(valid, key=lambda r: r[metric])
    lines += ["", "## The MDLM baseline", "",
              f"MDLM model, plain sampling (S = 0): best {metric} {_f(best[metric])} at T = {best['steps']} "
              f"(mean NFE {_f(best['nfe_total'], 1)}).", "", "## ProSeCo against it", ""]
    for name in variants:
        lines += _compare(name, [r for r in rows if r["model"] == name], baseline, best, corpus) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, choices=sorted(HEADLINE))
    parser.add_argument("--runs", default="runs/claim", help="folder holding the runs, evals and sweeps")
    parser.add_argument("--sweep", help="merged sweep.csv (default: RUNS/sweep-CORPUS/sweep.csv)")
    parser.add_argument("--out", help="write the markdown here too")
    args = parser.parse_args()
    text = report(args.corpus, Path(args.runs), Path(args.sweep) if args.sweep else None)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
