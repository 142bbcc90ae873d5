"""Bytes each rank communicates per optimizer step, per layout, against the analytic count.

Runs benchmarks/comm_worker.py under torchrun (gloo, CPU) with 2 and 4 processes: a 4 x 128 DiT,
vocab 24 (char tokenizer, padded to 64), L=16, global batch 8 in micro-batches of 2. For each
layout and step mode it counts the payload of every collective of one step (the bytes of the
tensor reduced, or of the gathered result; groups of one rank excluded) and compares it with the
count derived from the shapes (comm_worker.analytic). Step times are reported with no target:
two CPU cores and gloo say nothing about a GPU cluster.

    python -m benchmarks.comm
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tests.helpers import make_word_shards, torchrun

LAYOUTS = {
    2: {"dp2_fsdp": "parallel.dp=2", "dp2_ddp": "parallel.dp=2 parallel.data_parallel=ddp",
        "tp2": "parallel.tp=2", "tp2_sp": "parallel.tp=2 parallel.sequence_parallel=true"},
    4: {"dp2_tp2": "parallel.dp=2 parallel.tp=2",
        "dp2_tp2_sp": "parallel.dp=2 parallel.tp=2 parallel.sequence_parallel=true"},
}


def run() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="comm-bench-") as root:
        shards = make_word_shards(Path(root), seq_len=16)
        for world, layouts in LAYOUTS.items():
            out = Path(root) / f"comm{world}.json"
            torchrun(world, "benchmarks/comm_worker.py", str(shards), str(out), *layouts.values(), timeout=900)
            names = {v: k for k, v in layouts.items()}
            for result in json.loads(out.read_text()):
                name = f"{names[result['layout']]}_{result['mode']}"
                measured, expected = sum(result["bytes"].values()), sum(result["analytic"].values())
                detail = ", ".join(f"{kind} {result['bytes'].get(kind, 0) / 1e6:.3f} MB (analytic "
                                   f"{result['analytic'].get(kind, 0) / 1e6:.3f})"
                                   for kind in sorted(set(result["bytes"]) | set(result["analytic"])))
                setup = f"{world} ranks, {result['layout']}, {result['mode']}, {result['accum']} micro-batches per rank"
                rows += [
                    {"name": f"comm_mb_per_step_{name}", "value": round(measured / 1e6, 4), "unit": "MB/rank/step",
                     "what": f"collective payload per rank per step; {setup}; {detail}"},
                    {"name": f"comm_over_analytic_{name}", "value": round(measured / expected, 3), "unit": "ratio",
                     "what": f"measured / analytic payload; {setup}"},
                    {"name": f"step_s_{name}", "value": round(result["seconds"], 3), "unit": "s",
                     "what": f"one optimizer step on this 2-core CPU (no target); {setup}"},
                ]
    return rows


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
