"""Selection and verdict of E1, the fine-tuning protocol on QM9 (experiments/qm9_finetune.sh).

    python -m experiments.finetune_report select  --sweep SELECT.csv --out selected.txt
    python -m experiments.finetune_report verdict --sweep REPORT.csv --selection SELECT.csv \
        --baseline A@18000 --candidate B@14000 --out report.md

Settings are chosen on one seed's samples (`select`) and the numbers reported on fresh samples of
another seed (`verdict`), so that picking the best of many grid points does not flatter a model.

`select` keeps, for every model, its best setting by vun (valid, unique and novel molecules per
sample drawn; ties go to fewer NFEs) and every setting on its frontier of mean NFE against vun
(no other setting of that model has both fewer NFEs and a higher vun): the frontier is where a
speed-up, if any, lies.

The verdict rules, fixed before the experiment was run (issue 17):

- The baseline's best is the baseline model's (A@18k: MDLM continued for B's training FLOPs)
  highest-vun setting on the report seed, over plain sampling at every T.
- A candidate setting *matches* it when both its vun and its validity are at most 2 points (0.02)
  below the baseline's best. The speed-up is the baseline best's mean NFE over the fewest mean
  NFEs of a matching candidate setting.
- **reproduced**: speed-up >= 2; **partial**: 1.3 <= speed-up < 2; **refuted**: below 1.3, or no
  candidate setting matches.
- **higher quality**: the candidate's best vun exceeds the baseline's best by more than 2
  standard errors (binomial, both sides' samples), with the guards no worse: uniqueness not lower by
  more than 2 standard errors, each KS distance (QED, SA, ring count, to held-out molecules) not
  larger by more than 0.05, and the FCD to held-out molecules (where computed) not larger by more
  than 10 %.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from pretrain.files import atomic_write_text
from pretrain.sweep import markdown_table, nfe_axis, plot_sweep, read_rows, save_figure

MATCH_POINTS = 0.02
REPRODUCED, PARTIAL = 2.0, 1.3
KS_GUARDS = ("ks_qed", "ks_sa", "ks_ring_count")
KS_SLACK = 0.05
FCD_SLACK = 1.10
SETTING = ("steps", "corrector_steps", "corrector_every")
PLOT_COLUMNS = ("vun", "validity", "uniqueness", "fcd")


def _key(row: dict) -> tuple:
    return (row["model"], *(int(row[c]) for c in SETTING))


def frontier(rows: Sequence[dict]) -> list[dict]:
    """The rows that no other row beats on both mean NFE (fewer) and vun (higher), by NFE."""
    ordered = sorted(rows, key=lambda r: (r["nfe_total"], -r["vun"]))
    kept, best = [], -math.inf
    for row in ordered:
        if row["vun"] > best:
            kept.append(row)
            best = row["vun"]
    return kept


def best(rows: Sequence[dict]) -> dict:
    """The highest-vun row, fewer NFEs breaking ties."""
    return max(rows, key=lambda r: (r["vun"], -r["nfe_total"]))


def select(rows: Sequence[dict]) -> list[dict]:
    """Each model's best row and its NFE/vun frontier, once each, by model and NFE."""
    chosen: dict[tuple, dict] = {}
    for model in sorted({r["model"] for r in rows}):
        own = [r for r in rows if r["model"] == model]
        for row in [best(own), *frontier(own)]:
            chosen.setdefault(_key(row), row)
    return sorted(chosen.values(), key=lambda r: (r["model"], r["nfe_total"]))


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _se_diff(a: dict, b: dict, column: str, count: str = "num_samples") -> float:
    return math.hypot(standard_error(a[column], int(a[count])), standard_error(b[column], int(b[count])))


def verdict(rows: Sequence[dict], baseline: str, candidate: str) -> dict:
    """The speed-up and higher-quality verdicts of `candidate` against `baseline` (report-seed rows)."""
    base_rows = [r for r in rows if r["model"] == baseline]
    cand_rows = [r for r in rows if r["model"] == candidate]
    if not base_rows or not cand_rows:
        raise ValueError(f"the sweep needs rows of both {baseline!r} and {candidate!r}; it has "
                         f"{sorted({r['model'] for r in rows})}")
    reference = best([r for r in base_rows if r["corrector_steps"] == 0] or base_rows)
    matching = [r for r in cand_rows if r["vun"] >= reference["vun"] - MATCH_POINTS
                and r["validity"] >= reference["validity"] - MATCH_POINTS]
    result = {"baseline_best": reference, "match": None, "speedup": None, "speed_verdict": "refuted"}
    if matching:
        cheapest = min(matching, key=lambda r: r["nfe_total"])
        speedup = reference["nfe_total"] / cheapest["nfe_total"]
        result.update(match=cheapest, speedup=speedup,
                      speed_verdict="reproduced" if speedup >= REPRODUCED else
                      "partial" if speedup >= PARTIAL else "refuted")
    top = best(cand_rows)
    gap, se = top["vun"] - reference["vun"], _se_diff(top, reference, "vun")
    # Uniqueness is a share of the valid molecules: its standard error counts those.
    unique_se = math.hypot(standard_error(top["uniqueness"], int(top.get("n_valid", top["num_samples"]))),
                           standard_error(reference["uniqueness"],
                                          int(reference.get("n_valid", reference["num_samples"]))))
    guards = {"uniqueness": top["uniqueness"] >= reference["uniqueness"] - 2 * unique_se}
    for column in KS_GUARDS:
        if column in top and column in reference:
            guards[column] = top[column] <= reference[column] + KS_SLACK
    if not math.isnan(top.get("fcd", math.nan)) and not math.isnan(reference.get("fcd", math.nan)):
        guards["fcd"] = top["fcd"] <= reference["fcd"] * FCD_SLACK
    result.update(candidate_best=top, vun_gap=gap, vun_gap_se=se, guards=guards,
                  higher_quality=gap > 2 * se and all(guards.values()))
    return result


def _setting(row: dict) -> str:
    return (f"{row['model']} T={row['steps']} S={row['corrector_steps']} omega={row['corrector_every']} "
            f"(NFE {row['nfe_total']:.1f}, vun {row['vun']:.3f}, validity {row['validity']:.3f})")


def _guard_values(row: dict, reference: dict) -> str:
    columns = [c for c in ("uniqueness", *KS_GUARDS, "fcd") if not math.isnan(row.get(c, math.nan))]
    return ", ".join(f"{c} {row[c]:.3f} vs {reference.get(c, math.nan):.3f}" for c in columns)


def verdict_markdown(result: dict, baseline: str, candidate: str) -> str:
    lines = [f"- baseline best ({baseline}, plain sampling): {_setting(result['baseline_best'])}"]
    if result["match"] is None:
        lines.append(f"- no {candidate} setting comes within {MATCH_POINTS:.2f} of it on both vun and validity")
    else:
        lines.append(f"- cheapest matching {candidate} setting: {_setting(result['match'])}: "
                     f"speed-up {result['speedup']:.2f}x")
        lines.append(f"- the guards there, {candidate} against the baseline best (for reading; the speed-up "
                     f"rule does not use them): {_guard_values(result['match'], result['baseline_best'])}")
    lines.append(f"- **speed-up verdict: {result['speed_verdict']}** (reproduced >= {REPRODUCED}x, partial >= "
                 f"{PARTIAL}x)")
    guards = ", ".join(f"{k} {'ok' if ok else 'worse'}" for k, ok in result["guards"].items())
    lines.append(f"- {candidate} best: {_setting(result['candidate_best'])}; vun gap {result['vun_gap']:+.3f} "
                 f"({result['vun_gap'] / result['vun_gap_se']:+.1f} standard errors); guards: {guards}" if
                 result["vun_gap_se"] else f"- {candidate} best: {_setting(result['candidate_best'])}")
    lines.append(f"- **higher quality: {'yes' if result['higher_quality'] else 'no'}** (> 2 standard errors, "
                 "guards no worse)")
    return "\n".join(lines) + "\n"


def plot_verdict(rows: Sequence[dict], result: dict, path: Path) -> Path:
    """The report seed at a glance: each model's selected settings as one line of quality against
    mean NFE, the baseline's best marked, and the NFE at which a match would be a 2x speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in PLOT_COLUMNS if any(not math.isnan(r.get(c, math.nan)) for r in rows)]
    reference = result["baseline_best"]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.8), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for model in sorted({r["model"] for r in rows}):
            points = sorted((r for r in rows if r["model"] == model), key=lambda r: r["nfe_total"])
            ax.plot([p["nfe_total"] for p in points], [p.get(column, math.nan) for p in points],
                    marker="o", markersize=3, label=model)
        ax.plot([reference["nfe_total"]], [reference.get(column, math.nan)], "k*", markersize=12,
                label=f"{reference['model']} best")
        ax.axvline(reference["nfe_total"] / REPRODUCED, color="grey", linestyle=":", label="half its NFE")
        nfe_axis(ax, column)
    return save_figure(fig, axes, path, "E1 report seed: each model's selected settings")


def report(report_rows: list[dict], selection_rows: list[dict], secondary: list[tuple[str, list[dict]]],
           baseline: str, candidate: str, out: Path) -> Path:
    result = verdict(report_rows, baseline, candidate)
    headline = plot_verdict(report_rows, result, out.with_suffix(".png"))
    plot = plot_sweep(selection_rows, out.with_name(f"{out.stem}-selection.png"),
                      title="E1 selection seed: quality against NFE")
    parts = ["# E1: ProSeCo fine-tuning of an MDLM on QM9\n",
             "Settings chosen on the selection seed, numbers from fresh samples of the report seed "
             "(experiments/finetune_report.py states the rules).\n",
             "## Verdict\n", verdict_markdown(result, baseline, candidate),
             f"## Report seed (the selected settings)\n\n![report seed]({headline.name})\n",
             markdown_table(report_rows),
             f"## Selection seed, every setting (nucleus p = 1.0)\n\n![quality against NFE]({plot.name})\n",
             markdown_table(selection_rows)]
    for title, rows in secondary:
        parts += [f"## Secondary: {title}\n", markdown_table(rows)]
    atomic_write_text(out, "\n".join(parts))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pick = sub.add_parser("select", help="the settings to sample again on the report seed")
    pick.add_argument("--sweep", required=True, help="sweep.csv of the selection seed")
    pick.add_argument("--out", required=True, help="text file: 'label checkpoint T S omega' per line")
    judge = sub.add_parser("verdict", help="tables, plot and verdict")
    judge.add_argument("--sweep", required=True, help="sweep.csv of the report seed")
    judge.add_argument("--selection", required=True, help="sweep.csv of the selection seed")
    judge.add_argument("--secondary", action="append", default=[], help="more sweep.csv files to tabulate")
    judge.add_argument("--baseline", required=True)
    judge.add_argument("--candidate", required=True)
    judge.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "select":
        lines = [f"{r['model']} {r['checkpoint']} {r['steps']} {r['corrector_steps']} {r['corrector_every']}"
                 for r in select(read_rows(args.sweep))]
        atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
        print(f"{len(lines)} settings -> {args.out}")
        return
    secondary = [(Path(path).parent.name, read_rows(path)) for path in args.secondary if Path(path).exists()]
    out = report(read_rows(args.sweep), read_rows(args.selection), secondary, args.baseline, args.candidate,
                 Path(args.out))
    print(verdict_markdown(verdict(read_rows(args.sweep), args.baseline, args.candidate), args.baseline,
                           args.candidate))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
