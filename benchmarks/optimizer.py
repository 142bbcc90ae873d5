"""AdamW's step alone: optim.implementation fused against for-loop, side by side in one process.

The parameters and gradients of the step benchmark's model (configs/shakespeare.yaml: 4 x 256,
vocab 128, fp32), one optimizer per implementation over its own copy; each round times one
`optimizer.step()` of each, in alternating order (benchmarks/stats.py). Also the step's share of
a whole reuse training step is in benchmarks/official.py (ours_for_loop_adamw_over_official_reuse
beside ours_over_official_reuse).

    python -m benchmarks.optimizer [--min-rounds 16] [--max-rounds 100] [--budget-s 300] [--threshold 0.05]
"""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.stats import TOO_WIDE, paired_rounds, ratio_row, rounds_main
from benchmarks.step import BUDGET_S, CONFIG, MAX_ROUNDS, MIN_ROUNDS, SEQ_LEN, VOCAB, WARMUP
from pretrain.config import load_config
from pretrain.models import ModelShape
from pretrain.models.dit.model import DiT
from pretrain.optim import build_optimizer

IMPLEMENTATIONS = ("fused", "for-loop")


def _stepper(cfg, implementation: str):
    """One optimizer.step() of `implementation` over a fresh model with fixed gradients."""
    torch.manual_seed(0)
    model = DiT(cfg.model, ModelShape(VOCAB, SEQ_LEN))
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer = build_optimizer(model, dataclasses.replace(cfg.optim, implementation=implementation))
    return optimizer.step, sum(p.numel() for p in model.parameters())


def run(min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS, budget_s: float = BUDGET_S,
        threshold: float = TOO_WIDE) -> list[dict]:
    cfg = load_config(CONFIG)
    steppers = {name: _stepper(cfg, name) for name in IMPLEMENTATIONS}
    cases = {name: step for name, (step, _) in steppers.items()}
    rounds = paired_rounds(cases, [("fused", "for-loop")], min_rounds=min_rounds, max_rounds=max_rounds,
                           budget_s=budget_s, threshold=threshold, warmup=WARMUP)
    params = steppers["fused"][1]
    row = ratio_row("adamw_fused_over_for_loop", rounds.spread("fused", "for-loop"),
                    f"AdamW step time, optim.implementation fused / for-loop; {params:,} fp32 parameters of the "
                    f"{cfg.model.n_layers} x {cfg.model.d_model} DiT, {torch.get_num_threads()} threads, "
                    f"{rounds.describe()}, order alternated every round", threshold=threshold)
    return [row]


def main(argv: list[str] | None = None) -> None:
    rounds_main(run, __doc__, argv, MIN_ROUNDS, MAX_ROUNDS, BUDGET_S)


if __name__ == "__main__":
    main()
