"""Sampling-budget sweeps: quality against NFE for checkpoints x steps x corrector settings.

`proseco sweep` samples every (checkpoint, T, S, omega[, gamma]) point of a grid with the same seed
(so rows differ only by the setting; gamma, the guidance scale, for a model trained with labels
and a target class, `sampling.label`), scores the samples with the judge of the corpus' content
(pretrain/scoring.py) and writes `sweep.csv` (every number), `sweep.md` (the table) and
`sweep.png` (quality against mean total NFE, one line per model x corrector setting).

The functions are plain so that tests and experiment scripts can call them: the grid
(`make_grid`, `run_grid`), the writers (`write_samples`, `write_table`, `read_rows`) and the
tables and plots (`markdown_table`, `quality_columns`, `summary_markdown`, `plot_sweep`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.checkpoint import load_model, read_meta, resolve_checkpoint
from pretrain.files import atomic_path, atomic_write_text
from pretrain.sampler import Sampler, SampleResult
from pretrain.scoring import build_scorer

# Quality columns of the table and the plot, in order; the CSV keeps every metric.
# Each table leads with a metric that a sampler collapsed onto a few tokens cannot win: valid,
# unique (and novel) molecules per sample; the bigram divergence from held-out text.
SMILES_COLUMNS = ("vun", "validity", "uniqueness", "novelty", "qed_mean", "ks_qed", "ks_sa", "fcd")
TEXT_COLUMNS = ("bigram_js", "trigram_perplexity", "trigram_oov_rate", "unigram_entropy", "distinct_2",
                "repetition_rate")
NFE_COLUMNS = ("nfe_denoiser", "nfe_corrector", "nfe_total")
SETTING_COLUMNS = ("model", "steps", "corrector_steps", "corrector_every")
GUIDANCE_COLUMNS = ("label", "guidance")  # in the table when some row samples a class
# Read back from CSV as ints (everything else numeric is a float, text stays text).
_INT_COLUMNS = {"steps", "corrector_steps", "corrector_every", "label", "num_samples", "train_step", "n_samples",
                "n_valid", "n_unique", "n_novel", "trigram_n_words", "trigram_n_oov", "trigram_n_sentence_ends"}
_TEXT_COLUMNS = {"model", "checkpoint", "unmasking", "nucleus_cache"}
_BOOL_COLUMNS = {"collapsed"}


# ---------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class GridPoint:
    """One sampler setting: T unmasking steps, S corrector iterations every omega steps, guidance
    scale gamma (1: the conditional model alone, or no guidance)."""

    steps: int
    corrector_steps: int
    corrector_every: int
    guidance: float = 1.0


def make_grid(steps: Sequence[int], corrector_steps: Sequence[int], corrector_every: Sequence[int],
              guidance: Sequence[float] = (1.0,)) -> list[GridPoint]:
    """Every (T, S, omega, gamma) combination, ordered by S, omega, gamma, T. S=0 (plain MDLM
    sampling) ignores omega, so it appears once per T (with omega 1) instead of once per omega."""
    if not steps or not corrector_steps or not corrector_every or not guidance:
        raise ValueError("the grid needs at least one value of steps, corrector steps, corrector every and guidance")
    if min(steps) < 1 or min(corrector_steps) < 0 or min(corrector_every) < 1 or min(guidance) < 0:
        raise ValueError("steps and corrector_every must be >= 1, corrector_steps and guidance >= 0")
    points: list[GridPoint] = []
    for s in sorted(set(corrector_steps)):
        for omega in ([1] if s == 0 else sorted(set(corrector_every))):
            for gamma in sorted(set(guidance)):
                points += [GridPoint(t, s, omega, gamma) for t in sorted(set(steps))]
    return points


def point_name(label: str, point: GridPoint) -> str:
    """The file stem of a grid point's samples: LABEL_T{T}_S{S}_w{omega}[_g{gamma}]."""
    name = f"{label}_T{point.steps}_S{point.corrector_steps}_w{point.corrector_every}"
    return name + (f"_g{point.guidance:g}" if point.guidance != 1.0 else "")


def run_folder(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint (runs/NAME for runs/NAME/checkpoints/step_X)."""
    return resolve_checkpoint(checkpoint).parent.parent


def nfe_summary(result: SampleResult) -> dict[str, float]:
    """Mean forwards per sample: denoiser, corrector and their sum."""
    return {"nfe_denoiser": result.nfe_denoiser.float().mean().item(),
            "nfe_corrector": result.nfe_corrector.float().mean().item(),
            "nfe_total": result.nfe_total.float().mean().item()}


def run_grid(checkpoint: str | Path, points: Sequence[GridPoint], num_samples: int, *, batch_size: int | None = None,
             seed: int = 0, label: str | None = None, device: str | torch.device = "cpu",
             sampling_overrides: dict | None = None, shards: str | Path | None = None, novelty: bool = True,
             samples_dir: str | Path | None = None, log: Callable[[str], None] = print,
             fcd: bool = False) -> list[dict]:
    """Sample and score every grid point with one checkpoint (EMA weights); one row per point.

    Every point uses the same seed, so differences between rows come from the setting, not from
    different random draws. The row holds the setting, the mean NFEs, the wall time and every
    quality metric. With `samples_dir`, each point's samples (as scored) are kept there too, as
    LABEL_T{T}_S{S}_w{omega}[_g{gamma}].jsonl, so a table's numbers can be checked against its
    molecules. The class to sample comes with `sampling_overrides` ({"label": k}); a point's
    guidance scale gamma needs one (the sampler says so).
    """
    device = torch.device(device)
    path = resolve_checkpoint(checkpoint)
    model, cfg, tokenizer = load_model(path, device)
    label = label or cfg.name
    scorer = build_scorer(cfg, tokenizer, run_folder(path), shards, novelty, log, fcd=fcd)
    train_step = int(read_meta(path)["step"])
    rows = []
    for point in points:
        sampling = dataclasses.replace(cfg.sampling, **(sampling_overrides or {}), steps=point.steps,
                                       corrector_steps=point.corrector_steps, corrector_every=point.corrector_every,
                                       guidance=point.guidance, num_samples=num_samples,
                                       batch_size=batch_size or num_samples, seed=seed)
        started = time.perf_counter()
        result = Sampler.for_run(model, cfg, tokenizer, sampling, device).sample(num_samples)
        seconds = time.perf_counter() - started
        texts = scorer.texts(result.tokens)
        if samples_dir is not None:
            write_samples(Path(samples_dir) / f"{point_name(label, point)}.jsonl", texts, result)
        row = {"model": label, **dataclasses.asdict(point), "label": sampling.label, "nucleus_p": sampling.nucleus_p,
               "unmasking": sampling.unmasking, "nucleus_cache": sampling.nucleus_cache, "num_samples": num_samples,
               **nfe_summary(result), "seconds": seconds, "checkpoint": str(path), "train_step": train_step,
               **scorer.score(result.tokens, texts)}
        rows.append(row)
        guided = "" if sampling.label is None else f" class={sampling.label} gamma={point.guidance:g}"
        log(f"{label} T={point.steps} S={point.corrector_steps} omega={point.corrector_every}{guided}: "
            f"NFE {row['nfe_total']:.1f} ({row['nfe_denoiser']:.1f} + {row['nfe_corrector']:.1f}), "
            + ", ".join(f"{c} {_fmt(row[c])}" for c in quality_columns(rows) if c in row) + f" [{seconds:.0f} s]")
    return rows


# ---------------------------------------------------------------------------------------------
# Writers


def write_samples(path: str | Path, texts: Sequence[str], result: SampleResult) -> Path:
    """One JSON line per sample: its text, token ids and NFE counts (written whole, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as stream:
        for i, text in enumerate(texts):
            stream.write(json.dumps({"text": text, "tokens": result.tokens[i].tolist(),
                                     "nfe_denoiser": int(result.nfe_denoiser[i]),
                                     "nfe_corrector": int(result.nfe_corrector[i]),
                                     "nfe_total": int(result.nfe_total[i])}) + "\n")
    return path


def write_table(rows: Sequence[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write out_dir/sweep.csv (every key of every row) and out_dir/sweep.md; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    csv_path, md_path = out_dir / "sweep.csv", out_dir / "sweep.md"
    # Written whole, then renamed: a partial CSV is never mistaken for a finished sweep.
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(md_path, markdown_table(rows))
    return csv_path, md_path


def _parse(key: str, value: str):
    """A CSV cell back as the row held it: None when empty, int, float or text by column."""
    if value == "":
        return None
    if key in _TEXT_COLUMNS:
        return value
    if key in _BOOL_COLUMNS:
        return value == "True"
    if key in _INT_COLUMNS:
        return int(float(value))
    try:
        return float(value)
    except ValueError:
        return value


def read_rows(csv_path: str | Path) -> list[dict]:
    """The rows of a sweep.csv, numbers as numbers (empty cells dropped)."""
    with open(csv_path, newline="") as stream:
        return [{k: v for k, v in ((k, _parse(k, v)) for k, v in row.items()) if v is not None}
                for row in csv.DictReader(stream)]


# ---------------------------------------------------------------------------------------------
# Tables and plots


def quality_columns(rows: Sequence[dict]) -> list[str]:
    """The table's quality columns for these rows (SMILES or text metrics, those present)."""
    wanted = SMILES_COLUMNS if any("validity" in row for row in rows) else TEXT_COLUMNS
    return [c for c in wanted if any(c in row for row in rows)]


def _fmt(value) -> str:
    """A table cell: floats to 3 decimals (1 from 100 on), nan as "nan", the rest as str."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """model, T, S, omega, mean NFE (denoiser, corrector, total) and the quality columns; a
    collapsed row (`quality.is_collapsed`) says so beside its model."""
    headers = {"model": "model", "steps": "T", "corrector_steps": "S", "corrector_every": "omega",
               "label": "class", "guidance": "gamma",
               "nfe_denoiser": "NFE den", "nfe_corrector": "NFE cor", "nfe_total": "NFE total"}
    guided = GUIDANCE_COLUMNS if any(row.get("label") is not None for row in rows) else ()
    columns = [*SETTING_COLUMNS, *guided, *NFE_COLUMNS, *quality_columns(rows)]
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = {**row, "model": f"{row['model']} (collapsed)"} if row.get("collapsed") else row
        lines.append("| " + " | ".join(_fmt(cells.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(metrics: dict) -> str:
    """A two-column table of a flat metrics dict."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if isinstance(v, (int, float, str, np.floating))]
    return "\n".join(lines) + "\n"


def plot_sweep(rows: Sequence[dict], path: str | Path, title: str | None = None,
               columns: Sequence[str] | None = None) -> Path:
    """Each quality column (default: the table's) against mean total NFE (log scale), one line per
    model x (S, omega[, gamma])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(columns or quality_columns(rows))
    lines: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["model"], row["corrector_steps"], row["corrector_every"], row.get("guidance", 1.0))
        lines.setdefault(key, []).append(row)
    models = sorted({key[0] for key in lines})
    settings = sorted({key[1:] for key in lines})
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.8), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, column in zip(axes[0], columns):
        for (model, s, omega, gamma), points in sorted(lines.items()):
            points = sorted(points, key=lambda r: r["nfe_total"])
            x = [p["nfe_total"] for p in points]
            y = [p.get(column, float("nan")) for p in points]
            style = ["-", "--", ":", "-."][models.index(model) % 4]
            ax.plot(x, y, style, marker="o", markersize=3, color=cmap(settings.index((s, omega, gamma)) % 10),
                    label=f"{model} S={s}" + (f" ω={omega}" if s else "") + (f" γ={gamma:g}" if gamma != 1 else ""))
        nfe_axis(ax, column)
    return save_figure(fig, axes, path, title)


def nfe_axis(ax, column: str) -> None:
    """One panel of a quality-against-NFE figure: log2 NFE on x, the column as its title."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean NFE per sample (denoiser + corrector)")
    ax.set_title(column)
    ax.grid(alpha=0.3)


def save_figure(fig, axes, path: str | Path, title: str | None) -> Path:
    """The first panel's legend beside the figure, the title, written to `path` and closed."""
    import matplotlib.pyplot as plt

    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
