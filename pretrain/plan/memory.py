"""Memory per rank of a training step, from the config and the world size alone.

What a rank holds at the peak of a step (the start of backward, or within it):
- model state: fp32 parameters (the master weights: bf16 runs compute under autocast or FSDP2's
  bf16 parameter copies and keep these), fp32 gradients, AdamW's two fp32 moments, the EMA's fp32
  copy; each split over data-parallel ranks under parallel.data_parallel=fsdp/fsdp_no_reshard,
  whole under ddp; every one split over tensor-parallel ranks and pipeline stages;
- data parallelism's gathered parameters: under fsdp the root unit (embedding, output layer: the
  chunked loss keeps it gathered) and two blocks (the one computing, the one prefetched); under
  fsdp_no_reshard every unit this rank holds, from forward to backward; under ddp none (FSDP2 on a
  shard group of one computes with the parameters themselves) but a bf16 copy with
  parallel.param_dtype=bf16; and one unit's unsharded fp32 gradient before its reduction;
- with gradient accumulation under fsdp/fsdp_no_reshard, the unsharded gradients of every unit:
  FSDP2 reduces only in the last micro-batch's backward (set_requires_gradient_sync), so the earlier
  ones accumulate into the unsharded parameters' gradients (fp32, the reduce dtype), whole on every
  data-parallel rank, until that reduction turns them into the sharded ones counted above;
- autocast's bf16 copies of the weights (train.precision=bf16 with fp32 parameters), cached for
  the whole forward and backward;
- activations: what the blocks save for backward (pretrain/plan/families.py), for every micro-batch
  the pipeline schedule keeps in flight, times the rows of the ProSeCo step's graded pass: `reuse`
  keeps both forward graphs (z_t and y, b rows each) until one backward, `two_pass` runs pass 1 under
  no_grad (nothing kept) and grads one batch of 2b rows; with activation checkpointing a block
  keeps only its input, and backward recomputes one block at a time;
- the loss: with diffusion.loss_chunk_tokens = C > 0 only C x V logits live at once (recomputed in
  backward), with 0 the log-softmax of all rows x L x V logits is saved;
- the reuse step's buffered gradients: in `reuse` mode the corrector forward on y uses the same
  parameters as the z_t forward, in a second graph joined to the first in one backward. Autograd
  runs the later (y) graph first, and a parameter's AccumulateGrad runs only once every graph has
  delivered its part, so the engine holds each parameter's y-graph gradient in a buffer until the
  z_t graph's arrives: at the start of the z_t graph's backward (where the step peaks) a rank holds
  the gradients of every parameter both graphs use (the blocks, the embedding, the output layer),
  in the gradient dtype. Under FSDP2 these are the gradients of the UNSHARDED parameters (one per
  unit whose z_t backward has not come yet: all of them), split over tp but not over dp; under ddp
  they are whole; `two_pass` (one graph) has none. On one process without data parallelism the
  buffer becomes the parameter's .grad, which the gradients above already count, unless an earlier
  micro-batch of the step left a .grad there to add to (gradient accumulation). The buffer fills
  as the y graph's backward frees that graph's activations, block by block, so what it adds to the
  peak is the larger of its two ends: the buffered gradients less the y graph's activations (the
  z_t graph's backward begins), or the output layer's y gradient alone (the y graph's blocks begin);
  with data parallelism and one micro-batch per step, less the (sharded) gradients counted above,
  which do not exist yet at that moment and are made from the buffers unit by unit;
- on top of these, the larger of two moments of backward: the loss's (the kept final features
  and logits' buffers) and one block's (its gradients, and with checkpointing its recomputed
  activations), by which time the loss's buffers are freed.
Gradients are counted whole although the first micro-batch's backward fills them block by block:
with gradient accumulation or pipelining they are whole during every later backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.plan.families import FamilyPlan

GIB = 2**30


@dataclass(frozen=True)
class Layout:
    """The layout the plan is for, resolved from the config and the world size."""

    world_size: int
    dp: int
    tp: int
    pp: int
    virtual_stages: int
    layers_per_stage: tuple[int, ...]
    microbatches: int
    """Micro-batches each data-parallel rank runs per optimizer step."""
    micro_batch_size: int
    seq_len: int
    data_parallel: str
    schedule: str
    sequence_parallel: bool
    activation_checkpointing: bool
    param_bytes: int
    """Bytes of a gathered parameter (parallel.param_dtype)."""
    act_bytes: int
    """Bytes of an activation (train.precision)."""
    autocast: bool
    step_mode: str
    corrector: bool
    chunk_tokens: int
    ema: bool
    mask_bytes: int
    """Bytes per element of a dropout mask: 1 on CUDA (bool), the activation dtype on CPU."""

    @property
    def shards_state(self) -> bool:
        """Parameters, gradients and optimizer state are split over data-parallel ranks."""
        return self.dp > 1 and self.data_parallel in ("fsdp", "fsdp_no_reshard")

    def stages_of(self, pp_rank: int) -> list[int]:
        return [pp_rank + v * self.pp for v in range(self.virtual_stages)]


@dataclass
class RankMemory:
    """Bytes one rank holds at its peak, by what holds them."""

    pp_rank: int
    parameters: float = 0
    gradients: float = 0
    optimizer: float = 0
    ema: float = 0
    gathered: float = 0
    accumulated_gradients: float = 0
    """fsdp with several micro-batches: the unsharded fp32 gradients FSDP2 accumulates until the
    last micro-batch's reduction, beyond the sharded gradients counted in `gradients`."""
    weight_casts: float = 0
    activations: float = 0
    reuse_gradients: float = 0
    """Reuse mode: the y graph's gradients the autograd engine buffers until the z_t graph's
    backward delivers its part (unsharded under FSDP2; see the module docstring)."""
    reuse_at_peak: float = 0
    """What the buffered gradients add to the peak over the activations: the y graph's
    activations are freed as they fill."""
    loss: float = 0
    """At the loss's backward: the final features (and without chunks the log-softmax) kept, and
    the logits' buffers (last stage only)."""
    transient: float = 0
    """At a block's backward: its gradients (and, checkpointed, its recomputed activations)."""
    activations_checkpointed: float = 0
    """Activation peak with activation checkpointing (whatever the config says)."""
    activations_stored: float = 0
    """Activation peak without activation checkpointing."""
    in_flight: int = 1
    notes: list[str] = field(default_factory=list)

    PARTS = ("parameters", "gradients", "optimizer", "ema", "gathered", "accumulated_gradients", "weight_casts",
             "activations")

    @property
    def total(self) -> float:
        """The peak: everything held, what the reuse step's buffered gradients add, plus the larger
        of the loss's and a block's backward buffers."""
        return sum(getattr(self, name) for name in self.PARTS) + self.reuse_at_peak + max(self.loss, self.transient)

    @property
    def state(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.ema


def local_parameters(model: FamilyPlan, layout: Layout, pp_rank: int) -> tuple[float, float, float]:
    """This rank's parameters (tensor-parallel shard), its largest block and its root unit
    (embedding, output layer and the rest outside the blocks)."""
    tp, stages = layout.tp, layout.stages_of(pp_rank)
    last = layout.pp * layout.virtual_stages - 1
    blocks = sum(layout.layers_per_stage[s] for s in stages) * model.block_parameters / tp
    root = 0.0
    if 0 in stages:
        root += model.embedding_parameters / tp + model.other_parameters
    if last in stages:
        root += model.head_parameters / tp + (model.other_parameters if 0 not in stages else 0)
    return blocks + root, model.block_parameters / tp, root


def _in_flight(layout: Layout, pp_rank: int) -> tuple[int, float]:
    """Micro-batches whose activations this pipeline rank holds at once, and the blocks of each
    (1F1B: pp - rank warm-up micro-batches; GPipe: all; interleaved 1F1B: Megatron's warm-up count
    of model chunks, each 1/v of the rank's blocks)."""
    layers = sum(layout.layers_per_stage[s] for s in layout.stages_of(pp_rank))
    m, pp, v = layout.microbatches, layout.pp, layout.virtual_stages
    if pp == 1:
        return 1, layers
    if layout.schedule == "gpipe":
        return m, layers
    if layout.schedule == "1f1b":
        return min(pp - pp_rank, m), layers
    chunks = min((pp - pp_rank - 1) * 2 + (v - 1) * pp + 1, m * v)
    return chunks, layers / v


def _graded_rows(layout: Layout) -> tuple[int, int]:
    """Rows of the step's graded forward per micro-batch, and rows of one graph (reuse keeps two
    graphs of b rows; two_pass one of 2b; plain MDLM one of b)."""
    b = layout.micro_batch_size
    if not layout.corrector:
        return b, b
    return 2 * b, (b if layout.step_mode == "reuse" else 2 * b)


def _activations(model: FamilyPlan, layout: Layout, pp_rank: int, checkpointed: bool) -> tuple[float, float, float]:
    """Saved block activations of one pipeline rank, and what comes on top of them at the two
    moments a backward can peak: the loss's backward (its kept logits or features and the logits'
    gradients: last stage only), and a block's backward (its gradients; with checkpointing the
    block's recomputed activations), by which time the loss's buffers are freed."""
    rows, graph_rows = _graded_rows(layout)
    tokens, graph_tokens = rows * layout.seq_len, graph_rows * layout.seq_len
    d, tp = model.d_model, layout.tp
    block = model.block.bytes_per_token(d, layout.act_bytes, tp, layout.sequence_parallel, layout.mask_bytes)
    block_input = 4 * d / (tp if layout.sequence_parallel else 1)
    in_flight, layers = _in_flight(layout, pp_rank)
    saved = in_flight * layers * tokens * (block_input if checkpointed else block)
    block_backward = graph_tokens * d * layout.act_bytes * model.block.backward_extra / tp
    if checkpointed:
        block_backward += graph_tokens * block  # the block being recomputed
    loss = 0.0
    if layout.pp * layout.virtual_stages - 1 in layout.stages_of(pp_rank):
        vocab = model.vocab_rows / tp
        loss = in_flight * tokens * d * 4 * model.features_per_token
        if layout.chunk_tokens > 0:
            loss += 3 * min(layout.chunk_tokens, graph_tokens) * vocab * 4  # recomputed logits, log-softmax, gradient
        else:
            loss += in_flight * tokens * vocab * 4  # the log-softmax of every pass, kept for backward
            loss += 2 * graph_tokens * vocab * 4  # the gradients of one graph's logits
    return saved, loss, block_backward


def reuse_gradients(model: FamilyPlan, layout: Layout, local: float, saved: float) -> tuple[float, float]:
    """The y graph's gradients buffered until the z_t graph's backward, for `local` parameters on
    this rank (its tp shard of every unit; reuse runs on one pipeline stage), and what they add to
    the peak over the `saved` activations of both graphs (see the module docstring)."""
    if not (layout.corrector and layout.step_mode == "reuse"):
        return 0.0, 0.0
    if layout.dp > 1:  # FSDP2 (sharded or replicated): gradients of the unsharded parameters, in
        grad_bytes = layout.param_bytes  # their dtype (parallel.param_dtype; reduced in fp32 later)
    elif layout.microbatches > 1:  # an earlier micro-batch's .grad: the buffer is added to it
        grad_bytes = 4
    else:  # the buffer becomes .grad, which the gradients count already
        return 0.0, 0.0
    buffered = grad_bytes * local
    head = grad_bytes * (model.head_parameters / layout.tp + model.other_parameters)
    y_graph = saved / 2  # reuse keeps two graphs of b rows each
    at_peak = max(head, buffered - y_graph)
    if layout.dp > 1 and layout.microbatches == 1:
        # No micro-batch before this one: the sharded .grad the plan counts do not exist yet when the
        # z_t graph's backward begins; each unit's is made from its buffer as that backward passes.
        at_peak = max(0.0, at_peak - 4 * local / (layout.dp if layout.shards_state else 1))
    return buffered, at_peak


def rank_memory(model: FamilyPlan, layout: Layout, pp_rank: int) -> RankMemory:
    """What pipeline rank `pp_rank` (the same on every dp and tp rank of it) holds at its peak."""
    local, block, root = local_parameters(model, layout, pp_rank)
    shard = layout.dp if layout.shards_state else 1
    mem = RankMemory(pp_rank=pp_rank)
    mem.parameters = 4 * local / shard
    mem.gradients = 4 * local / shard
    mem.optimizer = 8 * local / shard
    mem.ema = 4 * local / shard if layout.ema else 0
    if layout.dp > 1:
        if layout.data_parallel == "fsdp":
            mem.gathered = layout.param_bytes * (root + 2 * block)
        elif layout.data_parallel == "fsdp_no_reshard":
            mem.gathered = layout.param_bytes * local
        elif layout.param_bytes == 2:  # ddp: FSDP2 on a shard group of one computes with the parameters
            mem.gathered = 2 * local  # themselves (measured), but a bf16 param_dtype casts a copy
        mem.gathered += 4 * max(block, root)  # one unit's unsharded fp32 gradient before its reduction
    if layout.shards_state and layout.microbatches > 1:
        mem.accumulated_gradients = 4 * local - mem.gradients
    if layout.autocast and layout.param_bytes == 4:
        mem.weight_casts = 2 * local
    mem.in_flight, _ = _in_flight(layout, pp_rank)
    saved, mem.loss, mem.transient = _activations(model, layout, pp_rank, layout.activation_checkpointing)
    mem.activations = saved
    mem.reuse_gradients, mem.reuse_at_peak = reuse_gradients(model, layout, local, saved)
    for checkpointed in (True, False):
        a, loss, transient = _activations(model, layout, pp_rank, checkpointed)
        if checkpointed:
            mem.activations_checkpointed = a + max(loss, transient)
        else:
            mem.activations_stored = a + max(loss, transient)
    return mem
