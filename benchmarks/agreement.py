"""Whether back-to-back runs agree: the paired-round benchmarks run several times in a row, each
run in a fresh process, and every ratio's largest median over its smallest across the runs.

A benchmark's own interval of the median (benchmarks/stats.py) says how far another run may land
if the rounds are independent draws; this measures it. It is `make bench` three times over for the
modules named, so it is not part of a plain `make bench`:

    python -m benchmarks.run agreement                                 step and official, 3 runs
    BENCH_AGREEMENT_MODULES="step compile" BENCH_AGREEMENT_RUNS=5 python -m benchmarks.run agreement

The figures of the last run replace those of its modules in docs/benchmarks.md, as `make bench`
would have written them; `agreement_<figure>` rows hold max / min of each ratio across the runs
(target <= 1.05: three runs within 5 %). The BENCH_* round settings apply to every run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.stats import TOO_WIDE, setting

ROOT = Path(__file__).resolve().parents[1]
MODULES = os.environ.get("BENCH_AGREEMENT_MODULES", "step official").split()
RUNS = setting("BENCH_AGREEMENT_RUNS", 3)


def agreement_rows(runs: list[list[dict]], limit: float = TOO_WIDE) -> list[dict]:
    """For every ratio measured from paired rounds (a row with a "spread") in each of `runs`: its
    largest median / smallest across them, with the medians in run order."""
    medians: dict[str, list[float]] = {}
    for rows in runs:
        for row in rows:
            if "spread" in row:
                medians.setdefault(row["name"], []).append(row["value"])
    out = []
    for name, values in sorted(medians.items()):
        if len(values) < len(runs):
            continue  # missing from some run (a module skipped): nothing to compare
        ratio = max(values) / min(values)
        verdict = "" if ratio <= 1 + limit else f"; the runs disagree by more than {100 * limit:.0f} %"
        out.append({"name": f"agreement_{name}", "value": round(ratio, 4), "unit": "ratio",
                    "what": f"largest / smallest median of {name} over {len(runs)} back-to-back runs, each in a "
                            f"fresh process (medians {', '.join(f'{v:g}' for v in values)}); target <= "
                            f"{1 + limit:.2f}{verdict}"})
    return out


def _one_run(modules: list[str]) -> list[dict]:
    """The rows of `modules`, measured in a child process as `make bench` would, each tagged with
    its module."""
    with tempfile.TemporaryDirectory(prefix="bench-agreement-") as scratch:
        out = Path(scratch) / "rows.json"
        subprocess.run([sys.executable, "-m", "benchmarks.agreement", "--out", str(out), *modules], cwd=ROOT,
                       check=True)
        return json.loads(out.read_text())


def run(modules: list[str] | None = None, runs: int = RUNS) -> list[dict]:
    modules = modules or MODULES
    measured = []
    for index in range(runs):
        print(f"  agreement: run {index + 1} of {runs} of {', '.join(modules)}", flush=True)
        measured.append(_one_run(modules))
    return measured[-1] + agreement_rows(measured)


def main(argv: list[str] | None = None) -> None:
    """The child of one run: each module's rows, with the module's name, into --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = []
    for module in args.modules:
        print(f"running benchmarks.{module} ...", flush=True)
        rows += [{**row, "module": module} for row in importlib.import_module(f"benchmarks.{module}").run()]
    args.out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
