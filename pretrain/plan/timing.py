"""Step time of a layout: the family's FLOP formula at a share of the device's peak, the pipeline
bubble, and the bytes each collective moves at a link bandwidth.

The collective payloads are benchmarks/comm_worker.py's analytic count (docs/parallel.md), which
the communication benchmark finds equal to what every collective of a step moves, to the byte for
data parallelism and within 0.1 % for tp and sp (DiT; fp32 activations there, the activation
dtype here). Per family the tensor-parallel terms differ only in how many stream-sized
collectives a block makes: the DiT's fused q/k/v makes one input all-reduce per block in
backward, LLaDA's three projections three and its SwiGLU's two inputs two more
(benchmarks/plan_comm_worker.py measures LLaDA's at tp=2 with and without sequence parallelism:
equal but for the step's few scalar reductions).
Time of a payload on n ranks: ring all-reduce 2(n-1)/n x bytes / bandwidth, all-gather and
reduce-scatter (n-1)/n x bytes / bandwidth; nothing overlaps with compute (an upper bound).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pretrain.plan.memory import Layout

# Per block: row-wise layers (one stream-sized reduction each in forward) and column-wise layers
# (one in backward), and whether the family gathers adaLN modulation vectors (DiT: 6 d per block,
# 2 d for the final layer; its c of cond_dim is reduced in backward).
TP_COLLECTIVES = {"dit": (2, 2, True), "llada": (2, 5, False)}


@dataclass(frozen=True)
class Links:
    """Bandwidths in GB/s per device, one way."""

    intra_node: float
    inter_node: float
    devices_per_node: int


def tp_payloads(family: str, layout: Layout, d: int, cond: int, layers: int, last_stage: bool,
                first_stage: bool) -> dict[str, float]:
    """comm_worker.analytic's tensor-parallel and loss terms for one rank per step (bytes)."""
    total: dict[str, float] = defaultdict(float)
    t, sp, L, b = layout.tp, layout.sequence_parallel, layout.seq_len, layout.micro_batch_size
    if t == 1:
        return total
    # rowwise: reductions of a block's row-wise outputs; colwise: its column-wise inputs (their
    # gradients are reduced in backward; with sp they are gathered in forward).
    rowwise, colwise, modulated = TP_COLLECTIVES[family]
    act = layout.act_bytes
    embed = 1 if first_stage else 0
    head = 1 if last_stage else 0

    def forward(n: int) -> None:
        stream = n * L * d * act
        if modulated:
            total["all_gather"] += n * (layers * 6 * d + 2 * d * head) * 4
        count = embed + rowwise * layers
        if sp:
            total["reduce_scatter"] += count * stream
            total["all_gather"] += (colwise * layers + head) * stream
        else:
            total["all_reduce"] += count * stream

    def backward(n: int) -> None:
        stream = n * L * d * act
        count = colwise * layers + head
        if modulated:
            total["all_reduce"] += (layers + head) * n * cond * 4
        if sp:
            total["reduce_scatter"] += count * stream
            total["all_gather"] += (rowwise * layers + embed) * stream
            if modulated:
                total["all_reduce"] += n * (layers * 6 * d + 2 * d * head) * 4
        else:
            total["all_reduce"] += count * stream

    for _ in range(layout.microbatches):
        if not layout.corrector:
            forward(b), backward(b)
        elif layout.step_mode == "reuse":
            forward(b), forward(b), backward(b), backward(b)
        else:
            forward(b), forward(2 * b), backward(2 * b)
        if last_stage:
            total["all_reduce"] += 2 * 3 * b * L * 4
            total["all_gather"] += 2 * t * b * L * (4 + 8)
    if sp:
        total["all_reduce"] += (2 * layers + 1) * d * 4
    return total


def dp_payloads(layout: Layout, root_bytes: float, block_bytes: float) -> dict[str, float]:
    """comm_worker.analytic's data-parallel terms: `root_bytes` and `block_bytes` are this rank's
    tensor-parallel shard of the root unit's and all its blocks' parameters, whole (not split by dp),
    in the gathered dtype (reduce-scatters are fp32: times 4 / param_bytes)."""
    total: dict[str, float] = defaultdict(float)
    if layout.dp == 1:
        return total
    fp32 = 4 / layout.param_bytes
    if layout.data_parallel == "ddp":
        total["all_reduce"] += (root_bytes + block_bytes) * fp32
        return total
    if layout.data_parallel == "fsdp_no_reshard":  # gathered once per micro-batch, kept until its backward
        gathered = root_bytes + block_bytes
    elif layout.corrector and layout.step_mode == "reuse":
        gathered = 2 * (root_bytes + block_bytes) + 2 * block_bytes + root_bytes
    elif layout.corrector:
        gathered = 3 * (root_bytes + block_bytes)
    else:
        gathered = 2 * (root_bytes + block_bytes)
    total["all_gather"] += layout.microbatches * gathered
    total["reduce_scatter"] += (root_bytes + block_bytes) * fp32
    return total


def pipeline_payload(layout: Layout, d: int) -> float:
    """Bytes a pipeline rank sends per step: the residual stream forward (pass 1 and the graded
    pass) and its gradient backward, per micro-batch (DiT's c vector and y's broadcast are small)."""
    if layout.pp == 1:
        return 0.0
    b, L = layout.micro_batch_size, layout.seq_len
    graded = 2 * b if layout.corrector else b
    first_pass = b if layout.corrector and layout.step_mode == "two_pass" else 0
    per_chunk = (first_pass + 2 * graded) * L * d * layout.act_bytes
    return layout.microbatches * layout.virtual_stages * per_chunk


def collective_seconds(payloads: dict[str, float], ranks: int, bandwidth_gbs: float) -> float:
    if ranks <= 1:
        return 0.0
    factor = {"all_reduce": 2 * (ranks - 1) / ranks, "all_gather": (ranks - 1) / ranks,
              "reduce_scatter": (ranks - 1) / ranks, "broadcast": 1.0}
    return sum(factor[kind] * nbytes for kind, nbytes in payloads.items()) / (bandwidth_gbs * 1e9)


def flops_multiplier(layout: Layout) -> int:
    """Forward units of work per sequence of the step: MDLM 3 (forward, backward = 2 forwards),
    ProSeCo reuse 6, two_pass 7 (docs/method.md); activation checkpointing recomputes the graded
    forwards once more (+1 per graded forward)."""
    if not layout.corrector:
        return 3 + (1 if layout.activation_checkpointing else 0)
    base = 6 if layout.step_mode == "reuse" else 7
    return base + (2 if layout.activation_checkpointing else 0)


def bubble_factor(layout: Layout) -> float:
    """Pipeline schedule time over its useful time: (m + pp - 1) / m, with v model chunks
    (interleaved 1F1B) (v m + pp - 1) / (v m)."""
    if layout.pp == 1:
        return 1.0
    chunks = layout.microbatches * (layout.virtual_stages if layout.schedule == "interleaved_1f1b" else 1)
    return (chunks + layout.pp - 1) / chunks
