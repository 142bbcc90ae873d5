"""How the DiT is parallelised: its tensor-parallel plan, its pipeline stages, and the layouts
it can take. Applied from outside to the plain model in model.py (torchtitan's
models/llama3/parallelize.py), with the generic pieces from parallel/.

Tensor parallelism, per block: the fused q/k/v projection and the first MLP layer column-wise
(its rows are head-major, so each rank holds whole heads with their q, k and v, and a slice of the
MLP), the attention output and second MLP layer row-wise (one
all-reduce each), the adaLN modulation column-wise with a gathered output. The input embedding is
vocabulary-parallel and the output layer column-wise over the (padded) vocabulary, its logits left
sharded for loss-parallel cross entropy and an exact vocabulary-parallel argmax.

With sequence parallelism the residual stream, the norms and the dropouts are split along the
sequence: row-wise layers reduce-scatter instead of all-reduce and column-wise layers all-gather
their input. The modulation vectors (shift/scale/gate) then meet only a slice of the sequence, so
their gradient is a partial sum per rank: a hook all-reduces it over the tensor-parallel group.

Pipeline stages: stage 0 owns the embedding and the conditioning, the last stage the final
adaLN layer and the output layer, the blocks are split as `ParallelConfig.layers_per_stage`
says; the residual stream and the conditioning vector c travel between stages.

What this plan needs of the model (heads, MLP and modulation widths divisible by tp) is checked
with the config, before any process starts: `DiTConfig.layout_problems`.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from parallel.apply import apply_parallelisms
from parallel.config import ParallelConfig
from parallel.mesh import Layout
from parallel.tensor import sum_gradient_hook
from pretrain.models import ModelShape, keep_stage_blocks
from pretrain.models.dit.config import DiTConfig
from pretrain.models.dit.model import DiT


def apply_tensor_parallel(model: DiT, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Shard `model` (a DiT, or a pipeline stage of one) over `tp_mesh` in place. Parameter names
    do not change."""
    stream = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    if model.vocab_embed is not None:
        parallelize_module(model.vocab_embed, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=stream))
    group = tp_mesh.get_group()
    for block in model.blocks.values():
        plan = {
            # Rows head-major ([H, 3, hd]): contiguous row blocks are whole heads with their q, k, v.
            "attn_qkv": ColwiseParallel(input_layouts=stream),
            "attn_out": RowwiseParallel(output_layouts=stream),
            "mlp.0": ColwiseParallel(input_layouts=stream),
            "mlp.2": RowwiseParallel(output_layouts=stream),
            "adaLN_modulation": ColwiseParallel(output_layouts=Replicate()),
        }
        if sequence_parallel:
            plan["norm1"] = SequenceParallel(use_local_output=True)
            plan["norm2"] = SequenceParallel(use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
        if sequence_parallel:
            block.adaLN_modulation.register_forward_hook(sum_gradient_hook(group))
    if model.output_layer is None:
        return
    head = {"adaLN_modulation": ColwiseParallel(output_layouts=Replicate()),
            "linear": ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)}
    if sequence_parallel:
        head["norm_final"] = SequenceParallel(use_local_output=True)
    parallelize_module(model.output_layer, tp_mesh, head)
    if sequence_parallel:
        model.output_layer.adaLN_modulation.register_forward_hook(sum_gradient_hook(group))


def parallelize(model: DiT, layout: Layout, mesh: DeviceMesh | None, cfg: ParallelConfig) -> DiT:
    """tp -> activation checkpointing -> compile -> data parallelism, in place (torchtitan's order)."""
    apply_parallelisms(model, model.blocks.values(), layout, mesh, cfg,
                       lambda tp_mesh, sequence_parallel: apply_tensor_parallel(model, tp_mesh, sequence_parallel))
    return model


def build_stage(cfg: DiTConfig, shape: ModelShape, stage: int, counts: list[int]) -> DiT:
    """On the meta device, what pipeline stage `stage` owns (its blocks, the embedding on the first
    stage, the head on the last): no other part is ever allocated. Parameter names are the full
    model's."""
    part = keep_stage_blocks(DiT(cfg, shape, device="meta"), stage, counts)
    if stage > 0:
        part.vocab_embed = None
        part.sigma_map = None
        part.cond_map = None  # the class labels enter c on stage 0, which sends c on
    if stage < len(counts) - 1:
        part.output_layer = None
    return part
