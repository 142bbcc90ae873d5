"""`make bench`: run the benchmarks, merge their figures into docs/benchmarks.json, rewrite
docs/benchmarks.md.

    python -m benchmarks.run                 all benchmarks
    python -m benchmarks.run step sampler    only these (other figures in the JSON are kept)
    python -m benchmarks.run agreement       step and official three times: do runs agree?

Each module has `run() -> list[{"name", "value", "unit", "what"}]`; one that has nothing to
measure here returns no rows and says why (`official` needs OFFICIAL_PROSECO, a checkout of the
official code: see benchmarks/official.py), and its figures from earlier runs stay.
docs/benchmarks.json is a flat object name -> number, so runs can be compared with any JSON diff;
docs/benchmarks.md holds the same figures with their units and what exactly was measured.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

MODULES = ["loader", "streaming", "sharding", "step", "gemm_count", "gemm_rate", "optimizer", "official", "compile",
           "sampler", "comm", "pipeline", "checkpoint", "convert", "faults", "zero", "memory", "build_memory"]
ON_REQUEST = ["agreement"]  # named only: `agreement` is some of the above several times over
DOCS = Path("docs")


def _machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def main(names: list[str]) -> None:
    names = names or MODULES
    unknown = sorted(set(names) - set(MODULES) - set(ON_REQUEST))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {MODULES + ON_REQUEST}")
    json_path, md_path = DOCS / "benchmarks.json", DOCS / "benchmarks.details.json"
    figures = json.loads(json_path.read_text()) if json_path.is_file() else {}
    details = json.loads(md_path.read_text()) if md_path.is_file() else {}
    for name in names:
        print(f"running benchmarks.{name} ...", flush=True)
        for row in importlib.import_module(f"benchmarks.{name}").run():
            figures[row["name"]] = row["value"]
            # A row may name its own module (agreement's rows of the modules it ran).
            details[row["name"]] = {"module": name, **row, "machine": _machine(),
                                    "date": datetime.date.today().isoformat()}
            print(f"  {row['name']} = {row['value']} {row['unit']}", flush=True)
    DOCS.mkdir(exist_ok=True)
    json_path.write_text(json.dumps(dict(sorted(figures.items())), indent=2) + "\n")
    md_path.write_text(json.dumps(dict(sorted(details.items())), indent=2) + "\n")
    (DOCS / "benchmarks.md").write_text(_markdown(details))


def _markdown(details: dict) -> str:
    lines = ["# Benchmarks", "",
             "Written by `make bench` (`python -m benchmarks.run`); every figure is also in "
             "`docs/benchmarks.json`. Ratios are measured side by side in one process and one run, "
             "because these machines are shared and noisy; absolute speeds are for this machine only. "
             "A ratio from paired rounds gives its median, IQR and the 95 % interval of the median "
             "(benchmarks/stats.py); a figure whose interval is wider than 5 % of its median says not to "
             "trust it. `python -m benchmarks.run agreement` runs step and official three times back to "
             "back and reports how far their medians differ.", ""]
    by_module: dict[str, list[dict]] = {}
    for row in details.values():
        by_module.setdefault(row["module"], []).append(row)
    for module in MODULES + ON_REQUEST:
        rows = by_module.get(module)
        if not rows:
            continue
        doc = (importlib.import_module(f"benchmarks.{module}").__doc__ or "").strip().split("\n\n")[0]
        lines += [f"## {module}", "", " ".join(doc.split()), "", "| figure | value | unit | what | measured |",
                  "|---|---|---|---|---|"]
        for row in sorted(rows, key=lambda r: r["name"]):
            lines.append(f"| `{row['name']}` | {row['value']} | {row['unit']} | {row['what']} | "
                         f"{row['date']}, {row['machine']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
