"""How fast the step's GEMMs run against the fastest GEMM this machine does: whether a faster step
at the same arithmetic is still possible.

At benchmarks/step.py's shape the GEMMs are most of the step's time on a CPU (see the profile rows
of benchmarks/official.py). If they already run at the rate of a large square GEMM, the CPU's
practical peak, no rewrite of the rest of the step can make it much faster at the same FLOPs:
only fewer FLOPs could. This measures, in interleaved rounds:

- the step's GEMM rate: the FLOPs of its aten mm/addmm/bmm/baddbmm calls (torch's
  FlopCounterMode, one step) over their self CPU time by torch.profiler (per step, over a few
  steps), for the ProSeCo reuse step;
- the rate of a square fp32 `torch.mm` of side LARGE_SIDE, the same threads;

and reports both rates and their per-round ratio (1: the step's GEMMs run at peak).

    python -m benchmarks.gemm_rate [--min-rounds 8] [--max-rounds 60] [--budget-s 120]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.gemm_count import CONFIG, GEMM_OPS, SEQ_LEN, VOCAB, reuse_step
from benchmarks.stats import TOO_WIDE, Spread, ratio_row, rounds_main, setting
from pretrain.config import load_config
from pretrain.models import ModelShape
from pretrain.models.dit.model import DiT

LARGE_SIDE = 2048  # 17 GFLOP per product: long enough to time, and past every cache
PROFILED_STEPS = 2  # per round
MIN_ROUNDS = setting("BENCH_MIN_ROUNDS", 8)
MAX_ROUNDS = setting("BENCH_MAX_ROUNDS", 60)
BUDGET_S = setting("BENCH_GEMM_RATE_BUDGET_S", 120.0)


def gemm_flops(step) -> int:
    """FLOPs of the GEMM calls (GEMM_OPS) of one call of `step`, by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        step()
    return sum(flops for op, flops in counter.get_flop_counts()["Global"].items()
               if op.__name__.split(".")[0] in GEMM_OPS)


def kernel_seconds(step, steps: int, is_kernel: Callable[[str], bool]) -> float:
    """Seconds per call of `step` in the operators whose profiler key `is_kernel` accepts: their
    self CPU time by torch.profiler over `steps` calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if is_kernel(e.key)) / steps / 1e6


def gemm_seconds(step, steps: int = PROFILED_STEPS) -> float:
    """Seconds per call of `step` spent in the GEMM kernels themselves."""
    keys = {f"aten::{op}" for op in GEMM_OPS}
    return kernel_seconds(step, steps, keys.__contains__)


def large_gemm_rate(side: int = LARGE_SIDE) -> float:
    """FLOP/s of one square fp32 product of `side` (best of two, after the first touches the memory)."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * side**3 / best


def measure(min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS, budget_s: float = BUDGET_S,
            threshold: float = TOO_WIDE) -> list[dict]:
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = DiT(cfg.model, ModelShape(VOCAB, SEQ_LEN))
    micro = cfg.data.micro_batch_size
    step = reuse_step(model, micro, corrector=True)
    flops = gemm_flops(step)
    step()  # warm-up
    in_step, large, ratios = [], [], []
    start = time.perf_counter()
    for index in range(max_rounds):
        # Order alternated every round, as in benchmarks/stats.py's paired rounds.
        measured = {}
        for name in (("step", "large") if index % 2 == 0 else ("large", "step")):
            measured[name] = flops / gemm_seconds(step) if name == "step" else large_gemm_rate()
        in_step.append(measured["step"])
        large.append(measured["large"])
        ratios.append(measured["step"] / measured["large"])
        rounds = index + 1
        if rounds >= min_rounds and (not Spread.of(ratios).too_wide(threshold)
                                     or time.perf_counter() - start > budget_s):
            break
    model.zero_grad(set_to_none=True)
    setup = (f"ProSeCo reuse step of the {cfg.model.n_layers} x {cfg.model.d_model} DiT, vocab {VOCAB}, L={SEQ_LEN}, "
             f"micro-batch {micro}, fp32, {torch.get_num_threads()} threads; {flops / 1e9:.2f} GFLOP of aten "
             f"{'/'.join(GEMM_OPS)} per step (FlopCounterMode) over their self CPU time (torch.profiler, "
             f"{PROFILED_STEPS} steps per round); {rounds} rounds, order alternated")
    return [
        {"name": "gemm_gflops_in_step", "value": round(statistics.median(in_step) / 1e9, 1), "unit": "GFLOP/s",
         "what": f"rate of the step's GEMMs, median; {setup}"},
        {"name": "gemm_gflops_large_square", "value": round(statistics.median(large) / 1e9, 1), "unit": "GFLOP/s",
         "what": f"rate of one {LARGE_SIDE} x {LARGE_SIDE} x {LARGE_SIDE} fp32 torch.mm, best of two per round, "
                 f"median over rounds; the same threads"},
        ratio_row("gemm_rate_in_step_over_large_square", Spread.of(ratios),
                  f"the step's GEMM rate / the large square GEMM's, per round: near 1, the step's GEMMs run at "
                  f"this machine's practical peak and only fewer FLOPs make the step faster; {setup}",
                  threshold=threshold),
    ]


def run() -> list[dict]:
    return measure()


def main(argv: list[str] | None = None) -> None:
    rounds_main(measure, __doc__, argv, MIN_ROUNDS, MAX_ROUNDS, BUDGET_S)


if __name__ == "__main__":
    main()
