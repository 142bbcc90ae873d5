"""How LLaDA is parallelised: its tensor-parallel plan, its pipeline stages, and the layouts it
can take. Applied from outside to the plain model in model.py (torchtitan's
models/llama3/parallelize.py), with the generic pieces from parallel/.

Tensor parallelism, per block: q, k, v and the MLP's gate (ff_proj) and up projections
column-wise (each rank holds whole query and key/value heads, in the same groups, and a slice of
the MLP), the attention output and the MLP's ff_out row-wise (one all-reduce each); the norms are
replicated. The input embedding is vocabulary-parallel and the output layer column-wise over the
(padded) vocabulary, its logits left sharded (Shard(-1)) for loss-parallel cross entropy and an
exact vocabulary-parallel argmax, as the DiT's.

With sequence parallelism the residual stream and the norms are split along the sequence:
row-wise layers reduce-scatter instead of all-reduce and column-wise layers all-gather their
input. Nothing in a block meets the sequence slice with a replicated activation (no adaLN), so
no gradient needs an extra reduction.

Pipeline stages: stage 0 owns the embedding, the last stage the final norm and the output layer,
the blocks are split as `ParallelConfig.layers_per_stage` says; the residual stream alone travels
between stages.

What this plan needs of the model (query heads, key/value heads and MLP width divisible by tp) is
checked with the config, before any process starts: `LLaDAConfig.layout_problems`.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from parallel.apply import apply_parallelisms
from parallel.config import ParallelConfig
from parallel.mesh import Layout
from pretrain.models import ModelShape, keep_stage_blocks
from pretrain.models.llada.config import LLaDAConfig
from pretrain.models.llada.model import LLaDA


def apply_tensor_parallel(model: LLaDA, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Shard `model` (a LLaDA, or a pipeline stage of one) over `tp_mesh` in place. Parameter
    names do not change."""
    stream = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    if model.wte is not None:
        parallelize_module(model.wte, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=stream))
    for block in model.blocks.values():
        plan = {name: ColwiseParallel(input_layouts=stream) for name in ("q_proj", "k_proj", "v_proj",
                                                                         "ff_proj", "up_proj")}
        plan["attn_out"] = RowwiseParallel(output_layouts=stream)
        plan["ff_out"] = RowwiseParallel(output_layouts=stream)
        if sequence_parallel:
            plan["attn_norm"] = SequenceParallel(use_local_output=True)
            plan["ff_norm"] = SequenceParallel(use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
    if model.ff_out is None:
        return
    head = {"ff_out": ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)}
    if sequence_parallel:
        head["ln_f"] = SequenceParallel(use_local_output=True)
    parallelize_module(model, tp_mesh, head)


def parallelize(model: LLaDA, layout: Layout, mesh: DeviceMesh | None, cfg: ParallelConfig) -> LLaDA:
    """tp -> activation checkpointing -> compile -> data parallelism, in place (torchtitan's order)."""
    apply_parallelisms(model, model.blocks.values(), layout, mesh, cfg,
                       lambda tp_mesh, sequence_parallel: apply_tensor_parallel(model, tp_mesh, sequence_parallel))
    return model


def build_stage(cfg: LLaDAConfig, shape: ModelShape, stage: int, counts: list[int]) -> LLaDA:
    """On the meta device, what pipeline stage `stage` owns (its blocks, the embedding on the first
    stage, the head on the last): no other part is ever allocated. Parameter names are the full
    model's."""
    part = keep_stage_blocks(LLaDA(cfg, shape, device="meta"), stage, counts)
    if stage > 0:
        part.wte = None
    if stage < len(counts) - 1:
        part.ln_f = None
        part.ff_out = None
    return part
