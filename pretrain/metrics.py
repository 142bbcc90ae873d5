"""Run reporting on rank 0: JSONL metrics (always), Weights & Biases (optional), progress, plots."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from pretrain.config import DiffusionConfig, LoggingConfig, RunConfig, to_dict
from pretrain.files import atomic_path

METRICS_FILE = "metrics.jsonl"
PLAIN_PROGRESS_S = 30.0
"""Seconds between two plain progress lines (job logs)."""


class MetricsLogger:
    """Writes one JSON object per record to run_dir/metrics.jsonl and mirrors it to wandb.

    On ranks other than 0 every method is a no-op, so callers need no rank checks.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 tokens_per_step: int = 0, run_id: str | None = None):
        self.enabled = enabled
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self._started, self._start_step, self._last_line = time.perf_counter(), start_step, None
        self.cfg: LoggingConfig = cfg.logging
        self.path = run_dir / METRICS_FILE
        self._wandb = None
        self._progress = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if self.cfg.wandb != "disabled":
            self._wandb = _start_wandb(cfg, run_dir, run_id)
        if self.cfg.progress and sys.stderr.isatty():
            self._progress = _Progress(total_steps, start_step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._wandb is not None:
            split = record.get("split", "train")
            self._wandb.log({f"{split}/{k}": v for k, v in record.items() if isinstance(v, (int, float))
                             and k not in ("step", "split")}, step=record["step"])

    def progress(self, step: int, loss: float) -> None:
        """Call after every optimizer step: the progress bar on a terminal (updated every step);
        a plain line for job logs when stderr is not one, at the first step, then every
        PLAIN_PROGRESS_S seconds and at the last step. Speed and ETA are measured since this
        process started training."""
        if not (self.enabled and self.cfg.progress):
            return
        now = time.perf_counter()
        seconds_per_step = (now - self._started) / max(step - self._start_step, 1)
        tokens_per_s = self.tokens_per_step / seconds_per_step
        if self._progress is not None:
            self._progress.update(step, loss, tokens_per_s)
            return
        if self._last_line is not None and now - self._last_line < PLAIN_PROGRESS_S and step < self.total_steps:
            return
        self._last_line = now
        eta = (self.total_steps - step) * seconds_per_step
        print(f"step {step}/{self.total_steps}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
              f"eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}", flush=True)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(cfg: RunConfig, run_dir: Path, run_id: str | None):
    try:
        import wandb
    except ImportError:
        from pretrain.errors import UserError

        raise UserError("logging.wandb is set but wandb is not installed: pip install -e .[wandb] "
                        "or set logging.wandb=disabled") from None
    os.environ.setdefault("WANDB_SILENT", "true")
    # The same id on every resume: wandb appends to that run instead of starting a new one.
    return wandb.init(project=cfg.logging.wandb_project, name=cfg.name, dir=str(run_dir), mode=cfg.logging.wandb,
                      config=to_dict(cfg), id=run_id, resume="allow")


class _Progress:
    """rich progress bar: step, loss, tokens/s, ETA."""

    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                             TimeRemainingColumn(), transient=False)
        self.console = self._bar.console
        self._task = self._bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
        self._bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self._bar.update(self._task, completed=step, loss=loss, tps=tokens_per_s)

    def stop(self) -> None:
        self._bar.stop()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_figure(records: list[dict], eps_train: float, eps_val: float, errors_upweighted: bool = False):
    """The loss curves, like with like: training terms (t ~ U[eps_train, 1], the raw weights) on
    one row and validation ones (t ~ U[eps_val, 1], EMA weights) on the other, the MDLM term and
    the corrector term each on its own axes. The total loss is their weighted sum, in metrics.jsonl.
    With errors up-weighted the corrector term scores correct positions by -p (App. C.3), so
    it goes below zero as the corrector learns: the title says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
    rows = (("train", f"training, t ~ U[{eps_train:g}, 1]", "-"),
            ("val", f"validation, t ~ U[{eps_val:g}, 1], EMA weights", "o-"))
    corrector = "corrector loss per token" + (" (errors up-weighted: < 0 is possible)" if errors_upweighted else "")
    terms = (("mdlm_nelbo", "MDLM NELBO per token (nats)"), ("corrector_nll", corrector))
    for row, (split, where, style) in enumerate(rows):
        points = [r for r in records if r.get("split") == split]
        steps = [r["step"] for r in points]
        for col, (key, what) in enumerate(terms):
            ax = axes[row][col]
            ax.plot(steps, [r.get(key) for r in points], style, markersize=3)
            ax.set_title(f"{what}\n{where}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_losses(run_dir: Path, diffusion: DiffusionConfig, out: Path | None = None) -> Path:
    """run_dir/loss.png from metrics.jsonl (`loss_figure`), labelled with the run's t ranges."""
    import matplotlib.pyplot as plt

    out = out or Path(run_dir) / "loss.png"
    fig = loss_figure(read_metrics(run_dir), diffusion.sampling_eps_training, diffusion.sampling_eps_validation,
                      diffusion.corrector_training and diffusion.corrector_errors_upweighted)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


class Throughput:
    """Tokens per second over the steps since the last call."""

    def __init__(self):
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._tokens / max(now - self._t, 1e-9)
        self._t, self._tokens = now, 0
        return rate
