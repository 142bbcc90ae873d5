"""parallel.compile on CPU: what compiling the blocks costs up front and what it saves per step.

At the shape of benchmarks/step.py (configs/shakespeare.yaml: 4 x 256, vocab 128, L=128, its
micro-batch, fp32) the blocks of one model are compiled with inductor (parallel/compile.py) and
its eager twin, same weights, is timed beside it. Compile time: the first ProSeCo reuse step of
the compiled model (dynamo tracing, AOTAutograd and inductor's C++ for forward and backward),
then the first two-pass step (its no-grad pass and its 2B-row pass add graphs), each minus the
eager step. Step time: compiled / eager for the reuse and the two-pass steps, the median of
per-round ratios of paired rounds whose order alternates (benchmarks/stats.py), with its
interquartile range and the 95 % interval of the median; rounds are added until every interval
is within 5 % of its median or a time budget ends, and a figure whose interval stays wider says so
in its row.

    python -m benchmarks.compile [--min-rounds 16] [--max-rounds 100] [--budget-s 300] [--threshold 0.05]
"""

from __future__ import annotations

import copy
import time

import torch
from torch._dynamo.utils import counters

from benchmarks.stats import TOO_WIDE, paired_rounds, ratio_row, rounds_main
from benchmarks.step import CONFIG, SEQ_LEN, VOCAB
from parallel.compile import COMPILE_BACKEND, apply_compile
from parallel.runner import LocalRunner
from pretrain.config import DiffusionConfig, load_config
from pretrain.models import ModelShape
from pretrain.models.dit.model import DiT
from pretrain.step import Objective, forward_backward

MIN_ROUNDS, MAX_ROUNDS, BUDGET_S, WARMUP = 16, 100, 300.0, 2
MODES = ("reuse", "two_pass")


def _batch(size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(5, VOCAB, (size, SEQ_LEN), generator=generator),
            "position": torch.arange(size), "valid": torch.ones(size, dtype=torch.bool)}


def _step(model: DiT, batch: dict, objective: Objective, mode: str) -> None:
    forward_backward(LocalRunner(model), [batch], objective, step=0, mode=mode,
                     backward_scale=1.0 / batch["tokens"].numel())
    model.zero_grad(set_to_none=True)


def _seconds(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _models(cfg) -> tuple[DiT, DiT]:
    torch.manual_seed(0)
    eager = DiT(cfg.model, ModelShape(VOCAB, SEQ_LEN))
    with torch.no_grad():  # non-zero weights, as after training (the zero-initialised head is atypical)
        for p in eager.parameters():
            p.normal_(0, 0.02)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled.blocks.values())
    return eager, compiled


def run(min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS, budget_s: float = BUDGET_S,
        threshold: float = TOO_WIDE) -> list[dict]:
    cfg = load_config(CONFIG)
    micro = cfg.data.micro_batch_size
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _models(cfg)
    batch = _batch(micro)
    objective = Objective.build(DiffusionConfig(), mask_id=4, vocab_size=VOCAB, seed=0, global_batch_size=micro)
    first = {}
    # The first step of each mode compiles what it needs (cold: inductor's on-disk caches of an
    # earlier run would hide most of it); the eager step is its baseline.
    with torch._inductor.config.patch(force_disable_caches=True):
        for mode in MODES:
            eager_s = _seconds(lambda mode=mode: _step(eager, batch, objective, mode))
            first[mode] = _seconds(lambda mode=mode: _step(compiled, batch, objective, mode)) - eager_s
    graphs = counters["stats"]["unique_graphs"]
    cases = {f"{kind}_{mode}": (lambda model=model, mode=mode: _step(model, batch, objective, mode))
             for mode in MODES for kind, model in (("eager", eager), ("compiled", compiled))}
    pairs = [(f"compiled_{mode}", f"eager_{mode}") for mode in MODES]
    rounds = paired_rounds(cases, pairs, min_rounds=min_rounds, max_rounds=max_rounds, budget_s=budget_s,
                           threshold=threshold, warmup=WARMUP)
    if counters["stats"]["unique_graphs"] != graphs:
        raise RuntimeError("the compiled blocks recompiled while being timed; the step-time figures would "
                           "include compile time")
    setup = (f"{cfg.model.n_layers} x {cfg.model.d_model} DiT, vocab {VOCAB}, L={SEQ_LEN}, micro-batch {micro}, "
             f"fp32, {COMPILE_BACKEND}, {torch.get_num_threads()} threads")
    rows = [ratio_row(f"compiled_over_eager_step_{mode}", rounds.spread(f"compiled_{mode}", f"eager_{mode}"),
                      f"step time with compiled blocks / eager, ProSeCo {mode} step (below 1: compile pays)",
                      threshold=threshold) for mode in MODES]
    for row in rows:
        row["what"] += f"; {setup}, {rounds.describe()}, order alternated every round"
    return rows + [
        {"name": "compile_first_step_s_reuse", "value": round(first["reuse"], 2), "unit": "s",
         "what": f"first ProSeCo reuse step with compiled blocks minus the eager step: compiling the "
                 f"block's forward and backward graphs, one measurement; {setup}"},
        {"name": "compile_first_step_s_two_pass", "value": round(first["two_pass"], 2), "unit": "s",
         "what": f"first two-pass step after that, minus the eager step: its no-grad and 2B-row graphs, one "
                 f"measurement; {setup}"},
        {"name": "compile_graphs", "value": graphs, "unit": "graphs",
         "what": "graphs dynamo compiled for both step modes (all blocks share them; none added while timed)"},
    ]


def main(argv: list[str] | None = None) -> None:
    rounds_main(run, __doc__, argv, MIN_ROUNDS, MAX_ROUNDS, BUDGET_S)


if __name__ == "__main__":
    main()
