"""GEMM calls of one training step: how many matrix-multiply kernels the step launches.

Counts the aten GEMM ops (mm, addmm, bmm, baddbmm) that reach the dispatcher during one
forward+backward of the ProSeCo reuse step and of the MDLM step, at benchmarks/step.py's shape
(configs/shakespeare.yaml's model, VOCAB = SEQ_LEN = 128, its micro-batch). The count depends
on the model's structure only, not on the machine or its speed: fewer, larger GEMMs (e.g. one
fused q/k/v projection instead of three) mean fewer kernel launches and better-shaped kernels
on accelerators. Attention itself runs as one fused SDPA kernel and is not a GEMM here.

    python -m benchmarks.gemm_count
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.runner import LocalRunner
from pretrain.config import DiffusionConfig, load_config
from pretrain.models import ModelShape
from pretrain.models.dit.model import DiT
from pretrain.step import Objective, forward_backward

CONFIG = "configs/shakespeare.yaml"
VOCAB, SEQ_LEN = 128, 128  # benchmarks/step.py's shape: the default char model, vocabulary padded to 64
GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


class GemmCounter(TorchDispatchMode):
    """Counts the GEMM ops (GEMM_OPS, any overload) dispatched while it is active, by op name."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in GEMM_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_gemms(fn: Callable[[], object]) -> Counter[str]:
    """GEMM calls by op name while `fn()` runs (backward included when fn calls it)."""
    with GemmCounter() as counter:
        fn()
    return counter.counts


def reuse_step(model: torch.nn.Module, micro: int, corrector: bool) -> Callable[[], None]:
    """One forward+backward of the step (reuse mode; plain MDLM without the corrector) on a fixed
    micro-batch of `micro` sequences."""
    generator = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(5, VOCAB, (micro, SEQ_LEN), generator=generator),
             "position": torch.arange(micro), "valid": torch.ones(micro, dtype=torch.bool)}
    objective = Objective.build(DiffusionConfig(corrector_training=corrector), mask_id=4, vocab_size=VOCAB, seed=0,
                                global_batch_size=micro)

    def step() -> None:
        forward_backward(LocalRunner(model), [batch], objective, step=0, mode="reuse",
                         backward_scale=1.0 / batch["tokens"].numel())

    return step


def step_gemms(model: torch.nn.Module, micro: int, corrector: bool) -> Counter[str]:
    """GEMM calls of one forward+backward of the step (reuse mode) on a micro-batch of `micro`."""
    counts = count_gemms(reuse_step(model, micro, corrector))
    model.zero_grad(set_to_none=True)
    return counts


def run() -> list[dict]:
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = DiT(cfg.model, ModelShape(VOCAB, SEQ_LEN))
    micro = cfg.data.micro_batch_size
    setup = (f"{cfg.model.n_layers} x {cfg.model.d_model} DiT, vocab {VOCAB}, L={SEQ_LEN}, micro-batch {micro}; "
             f"aten {'/'.join(GEMM_OPS)} calls counted with a TorchDispatchMode")
    rows = []
    for name, corrector, what in (("gemm_calls_per_step_proseco_reuse", True, "ProSeCo reuse step (2 x fwd+bwd)"),
                                  ("gemm_calls_per_step_mdlm", False, "MDLM step (fwd+bwd)")):
        counts = step_gemms(model, micro, corrector)
        by_op = ", ".join(f"{op} {counts[op]}" for op in GEMM_OPS if counts[op])
        rows.append({"name": name, "value": sum(counts.values()), "unit": "calls",
                     "what": f"GEMM kernel calls of one {what} ({by_op}); {setup}"})
    return rows


def main() -> None:
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
