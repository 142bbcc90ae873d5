"""Pipeline parallelism at pp=2 on CPU: the bubble and the cost of ProSeCo's pass 1.

Runs benchmarks/pipeline_worker.py under torchrun with 2 ranks (one stage each, or two virtual
stages each for interleaved 1F1B): a 4 x 512 DiT, L=128, micro-batches of 4, the two-pass step.
For each schedule and micro-batch count m it reports the bubble of pass 2, measured as the share
of the pass a stage spends outside its forward/backward computations (mean over the stages),
next to the textbook (p - 1) / (m + p - 1) (interleaved: (p - 1) / (v m + p - 1)), and pass 1's
wall time over pass 2's. Pass 1 is a forward of m micro-batches of b rows; pass 2 a forward and
backward of m micro-batches of 2b rows, so its floor is about 1/6.

    python -m benchmarks.pipeline
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from tests.helpers import make_word_shards, torchrun

STAGES = 2


def run() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as root:
        shards = make_word_shards(Path(root), seq_len=128, documents=400)
        out = Path(root) / "pipeline.json"
        torchrun(STAGES, "benchmarks/pipeline_worker.py", str(shards), str(out), timeout=1800)
        rows = json.loads(out.read_text())
    cases = defaultdict(list)
    for row in rows:
        cases[(row["schedule"], row["virtual"], row["microbatches"])].append(row)
    figures, ratios = [], []
    for (schedule, virtual, m), ranks in cases.items():
        bubble = statistics.mean(1 - r["pass2_busy_s"] / r["pass2_s"] for r in ranks)
        ratio = statistics.mean(r["pass1_s"] / r["pass2_s"] for r in ranks)
        ratios.append(ratio)
        formula = (STAGES - 1) / (virtual * m + STAGES - 1)
        setup = f"pp={STAGES}, {schedule}" + (f" with {virtual} virtual stages per rank" if virtual > 1 else "") + \
            f", {m} micro-batches of 4 x 128 tokens, 4 x 512 DiT, two-pass step, gloo on CPU"
        name = f"{schedule}_m{m}"
        figures += [
            {"name": f"pp_bubble_{name}", "value": round(bubble, 3), "unit": "fraction",
             "what": f"idle share of pass 2, mean over stages (textbook {formula:.3f}); {setup}"},
            {"name": f"pp_bubble_formula_{name}", "value": round(formula, 3), "unit": "fraction",
             "what": f"(p - 1) / (v m + p - 1) for the same case; {setup}"},
            {"name": f"pp_pass1_over_pass2_{name}", "value": round(ratio, 3), "unit": "ratio",
             "what": f"wall time of pass 1 / pass 2; {setup}"},
        ]
    figures.append({"name": "pp_pass1_over_pass2", "value": round(statistics.median(ratios), 3), "unit": "ratio",
                    "what": f"median over the schedules above of pass 1 / pass 2 wall time at pp={STAGES}; floor "
                            "about 1/6, target <= 0.30"})
    return figures


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
