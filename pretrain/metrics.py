"""Run reporting on rank 0: JSONL metrics (always), Weights & Biases (optional), progress, plots."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from pretrain.config import LoggingConfig, RunConfig, to_dict
from pretrain.files import atomic_path

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Writes one JSON object per record to run_dir/metrics.jsonl and mirrors it to wandb.

    On ranks other than 0 every method is a no-op, so callers need no rank checks.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.cfg: LoggingConfig = cfg.logging
        self.path = run_dir / METRICS_FILE
        self._wandb = None
        self._progress = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if self.cfg.wandb != "disabled":
            self._wandb = _start_wandb(cfg, run_dir)
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

    def progress(self, step: int, loss: float, tokens_per_s: float, seconds_per_step: float) -> None:
        """The progress bar on a terminal; a plain line (for job logs) when stderr is not one."""
        if not (self.enabled and self.cfg.progress):
            return
        if self._progress is not None:
            self._progress.update(step, loss, tokens_per_s)
            return
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


def _start_wandb(cfg: RunConfig, run_dir: Path):
    try:
        import wandb
    except ImportError:
        from pretrain.errors import UserError

        raise UserError("logging.wandb is set but wandb is not installed: pip install -e .[wandb] "
                        "or set logging.wandb=disabled") from None
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.logging.wandb_project, name=cfg.name, dir=str(run_dir), mode=cfg.logging.wandb,
                      config=to_dict(cfg), resume="allow")


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


def plot_losses(run_dir: Path, out: Path | None = None) -> Path:
    """PNG of the training loss and its two terms, with validation points, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = out or Path(run_dir) / "loss.png"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        rows = [r for r in records if r.get("split") == split]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r.get("mdlm_nelbo") for r in rows], style, label=f"{split} MDLM NELBO")
        axes[1].plot(steps, [r.get("corrector_nll") for r in rows], style, label=f"{split} corrector loss")
        if split == "train":
            axes[0].plot(steps, [r.get("loss") for r in rows], style, alpha=0.5, label="train total loss")
    axes[0].set_title("MDLM NELBO per token (nats)")
    axes[1].set_title("corrector loss per token")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
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
