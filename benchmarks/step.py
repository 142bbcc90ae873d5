"""Cost of the ProSeCo step against the MDLM step, side by side in one process.

For the default model (configs/shakespeare.yaml: 4 x 256, vocab 128, L=128) and the same
micro-batch, times forward+backward of: MDLM (one pass), ProSeCo reuse (the official cost: two
passes with gradient), ProSeCo two-pass (a no-grad pass, then one graded pass of both halves)
and MDLM at twice the batch. Every ratio is the median of per-round ratios from paired rounds
whose order alternates (benchmarks/stats.py), reported with its interquartile range and the 95 %
interval of the median; rounds are added until every interval is within 5 % of its median or a
time budget ends, and a figure whose interval stays wider says so in its row. Also: activation
memory (bytes saved for backward, exact and device independent), FLOPs per step from the formula
(checked against torch's FlopCounterMode in tests/test_model.py).

Floors: 2.0 for reuse (twice the tokens through forward and backward), 7/3 = 2.33 for two-pass
(plus one forward). On a CPU whose per-token cost grows with the batch (caches), MDLM at twice
the batch is reported too: it is what reuse actually competes with.

    python -m benchmarks.step [--min-rounds 16] [--max-rounds 100] [--budget-s 300] [--threshold 0.05]

Under `make bench` (no flags) the environment sets the same: BENCH_MIN_ROUNDS, BENCH_MAX_ROUNDS,
BENCH_BUDGET_S, and BENCH_WARMUP for the untimed rounds (benchmarks/official.py reads them too).
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.stats import TOO_WIDE, Rounds, paired_rounds, ratio_row, rounds_main, setting
from parallel.runner import LocalRunner
from pretrain.config import DiffusionConfig, load_config
from pretrain.models import ModelShape
from pretrain.models.dit.model import DiT, forward_flops_per_sequence
from pretrain.step import Objective, forward_backward

CONFIG = "configs/shakespeare.yaml"
VOCAB, SEQ_LEN = 128, 128  # the default char model: ~70 characters, padded to a multiple of 64
MIN_ROUNDS = setting("BENCH_MIN_ROUNDS", 16)
MAX_ROUNDS = setting("BENCH_MAX_ROUNDS", 100)
BUDGET_S = setting("BENCH_BUDGET_S", 300.0)
WARMUP = setting("BENCH_WARMUP", 2)  # untimed rounds first
# (row name, numerator case, denominator case, what it is)
RATIOS = [
    ("proseco_over_mdlm_reuse", "reuse", "mdlm",
     "step time ProSeCo reuse / MDLM at equal batch; floor 2.0, target <= 2.05"),
    ("proseco_over_mdlm_two_pass", "two_pass", "mdlm",
     "step time ProSeCo two-pass / MDLM at equal batch; floor 2.33, target <= 2.40"),
    ("proseco_reuse_over_mdlm_2x_batch", "reuse", "mdlm_2x_batch",
     "step time ProSeCo reuse / MDLM at twice the batch (same tokens through the network)"),
    ("mdlm_2x_batch_over_mdlm", "mdlm_2x_batch", "mdlm",
     "step time MDLM at twice the batch / MDLM (2.0 when the per-token cost does not depend on the batch)"),
]


def _batch(size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(5, VOCAB, (size, SEQ_LEN), generator=generator),
            "position": torch.arange(size), "valid": torch.ones(size, dtype=torch.bool)}


def _objective(corrector: bool, batch_size: int) -> Objective:
    return Objective.build(DiffusionConfig(corrector_training=corrector), mask_id=4, vocab_size=VOCAB, seed=0,
                           global_batch_size=batch_size)


def _step(model, batch, objective, mode) -> None:
    forward_backward(LocalRunner(model), [batch], objective, step=0, mode=mode,
                     backward_scale=1.0 / batch["tokens"].numel())
    model.zero_grad(set_to_none=True)


def _saved_bytes(model, batch, objective, mode) -> int:
    """Bytes of the tensors autograd keeps for backward (the activation memory of the step)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(model, batch, objective, mode)
    return sum(seen.values())


def _cases(model, micro: int) -> dict[str, tuple[dict, Objective, str]]:
    return {
        "mdlm": (_batch(micro), _objective(False, micro), "reuse"),
        "mdlm_2x_batch": (_batch(2 * micro), _objective(False, 2 * micro), "reuse"),
        "reuse": (_batch(micro), _objective(True, micro), "reuse"),
        "two_pass": (_batch(micro), _objective(True, micro), "two_pass"),
    }


def measure(model, cases: dict, min_rounds: int, max_rounds: int, budget_s: float, threshold: float,
            warmup: int = WARMUP) -> Rounds:
    """Paired, alternating rounds of every case until the ratios of RATIOS are within `threshold`."""
    steps = {name: (lambda case=case: _step(model, *case)) for name, case in cases.items()}
    return paired_rounds(steps, [(a, b) for _, a, b, _ in RATIOS], min_rounds=min_rounds, max_rounds=max_rounds,
                         budget_s=budget_s, threshold=threshold, warmup=warmup)


def run(min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS, budget_s: float = BUDGET_S,
        threshold: float = TOO_WIDE) -> list[dict]:
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = DiT(cfg.model, ModelShape(VOCAB, SEQ_LEN))
    with torch.no_grad():  # non-zero weights, as after training (the zero-initialised head is atypical)
        for p in model.parameters():
            p.normal_(0, 0.02)
    micro = cfg.data.micro_batch_size
    cases = _cases(model, micro)
    rounds = measure(model, cases, min_rounds, max_rounds, budget_s, threshold)
    median = {name: statistics.median(values) for name, values in rounds.times.items()}
    memory = {name: _saved_bytes(model, *cases[name]) for name in ("mdlm", "reuse", "two_pass")}
    flops = forward_flops_per_sequence(cfg.model, ModelShape(VOCAB, SEQ_LEN)) * micro
    setup = (f"{cfg.model.n_layers} x {cfg.model.d_model} DiT, vocab {VOCAB}, L={SEQ_LEN}, micro-batch {micro}, fp32, "
             f"{torch.get_num_threads()} threads, {rounds.describe()}, order alternated every round")
    tokens = micro * SEQ_LEN
    rows = [ratio_row(name, rounds.spread(a, b), what, threshold=threshold) for name, a, b, what in RATIOS]
    for row in rows:
        row["what"] += f"; {setup}"
    return rows + [
        {"name": "train_tokens_per_s_proseco_reuse", "value": round(tokens / median["reuse"]), "unit": "tokens/s",
         "what": f"data tokens per second of the ProSeCo reuse step, median; {setup}"},
        {"name": "train_tokens_per_s_mdlm", "value": round(tokens / median["mdlm"]), "unit": "tokens/s",
         "what": f"data tokens per second of the MDLM step, median; {setup}"},
        {"name": "activation_mb_mdlm", "value": round(memory["mdlm"] / 2**20, 1), "unit": "MiB",
         "what": f"bytes saved for backward by the MDLM step; {setup}"},
        {"name": "activation_over_mdlm_reuse", "value": round(memory["reuse"] / memory["mdlm"], 3), "unit": "ratio",
         "what": "activation memory of ProSeCo reuse / MDLM (both graphs live until backward)"},
        {"name": "activation_over_mdlm_two_pass", "value": round(memory["two_pass"] / memory["mdlm"], 3),
         "unit": "ratio", "what": "activation memory of ProSeCo two-pass / MDLM (pass 1 stores nothing)"},
        {"name": "train_flops_per_step_reuse", "value": 6 * flops, "unit": "FLOPs",
         "what": f"formula FLOPs of one ProSeCo reuse micro-batch (2 x forward+backward); {setup}"},
        {"name": "train_tflops_per_s_reuse", "value": round(6 * flops / median["reuse"] / 1e12, 4), "unit": "TFLOP/s",
         "what": f"achieved model FLOP/s of the reuse step on this machine, median; {setup}"},
    ]


def main(argv: list[str] | None = None) -> None:
    rounds_main(run, __doc__, argv, MIN_ROUNDS, MAX_ROUNDS, BUDGET_S)


if __name__ == "__main__":
    main()
