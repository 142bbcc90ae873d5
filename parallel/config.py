"""How a job is laid out over its processes: the `parallel:` section of a run config.

A library-side config, as OLMo-core's `TensorParallelConfig`: the application embeds it in its
own run config, and `problems()` checks it against the world size before any process group
exists, the declared ranges of its fields (ranges.py) included. Checks that need the model (heads
divisible by tp, ...) belong to the model's own plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from parallel.ranges import field_problems


@dataclass
class ParallelConfig:
    """Layout of the device mesh and how each dimension is applied."""

    dp: int = field(default=-1, metadata={"ge": -1})
    """Data-parallel size; -1 infers it as world_size / (tp * pp)."""
    tp: int = field(default=1, metadata={"ge": 1})
    """Tensor-parallel size (attention heads and the vocabulary are split)."""
    pp: int = field(default=1, metadata={"ge": 1})
    """Pipeline-parallel stages."""
    sequence_parallel: bool = False
    """With tp > 1, shard norms and dropouts along the sequence."""
    data_parallel: Literal["fsdp", "fsdp_no_reshard", "ddp"] = "fsdp"
    """fsdp: full sharding (ZeRO-3); fsdp_no_reshard: keep parameters after forward (ZeRO-2-like);
    ddp: replicated parameters."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    """Pipeline schedule."""
    pp_virtual_stages: int = field(default=1, metadata={"ge": 1})
    """Model chunks per pipeline rank (interleaved_1f1b needs at least 2)."""
    pp_layers_per_stage: list[int] | None = field(default=None, metadata={"ge": 1})
    """Blocks per stage (its length is pp * pp_virtual_stages); None balances automatically."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    compile: bool = False
    """torch.compile each block in place (after activation checkpointing, before FSDP); parameter
    names and checkpoints are unchanged. Inductor needs a C++ compiler; the first step pays the
    compile time (benchmarks/compile.py). Needs tp=1; dp, pp and DeepSpeed ZeRO-1/2 combine with it."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP parameter dtype during compute; gradients are always reduced in fp32."""
    timeout_s: float = field(default=600.0, metadata={"gt": 0})
    """Collective timeout: a dead or stuck rank ends the job with an error after this long."""
    engine: Literal["native", "deepspeed"] = "native"
    """native: PyTorch's FSDP2/DDP, tensor and pipeline parallelism; deepspeed: DeepSpeed ZeRO
    stage 1, 2 or 3 (parallel.deepspeed_config) for data-parallel-only layouts (tp = pp = 1).
    Both train the same model on the same data with the same step; see docs/deepspeed.md."""
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    """With engine=deepspeed: a DeepSpeed JSON holding zero_optimization (stage, offload_optimizer)
    and optionally bf16. Batch sizes, accumulation, AdamW, clipping and the learning-rate schedule
    come from this run config (data.*, optim.*), never from the JSON."""

    @property
    def num_stages(self) -> int:
        """Pipeline stages over all ranks (pp * pp_virtual_stages)."""
        return self.pp * self.pp_virtual_stages

    def resolve_dp(self, world_size: int) -> int:
        """Data-parallel size for a world of `world_size` processes (after `problems` found none)."""
        return self.dp if self.dp > 0 else world_size // (self.tp * self.pp)

    def problems(self, world_size: int, num_layers: int) -> list[str]:
        """Every reason this layout cannot run `num_layers` blocks on `world_size` processes,
        each naming the field and the fix (empty: it can)."""
        found = field_problems(self, "parallel.")

        def need(ok: bool, message: str) -> None:
            if not ok:
                found.append(message)

        need(self.dp != 0, "parallel.dp must be -1 (infer from the world size) or >= 1, got 0; set parallel.dp=-1 "
             "or the data-parallel size")
        need(world_size >= 1, f"the world size must be >= 1 process, got {world_size}")
        model_parallel = max(self.tp, 1) * max(self.pp, 1)
        need(world_size % model_parallel == 0, f"world size {world_size} is not divisible by parallel.tp * "
             f"parallel.pp = {model_parallel}; launch a multiple of tp * pp processes")
        need(self.dp <= 0 or self.dp * model_parallel == world_size,
             f"parallel.dp * tp * pp = {self.dp * model_parallel} but {world_size} processes were launched; "
             "set parallel.dp=-1 to infer it or launch that many")
        found += self._pipeline_problems(num_layers)
        if self.compile:
            found += self._compile_problems()
        if self.engine == "deepspeed":
            found += self._deepspeed_problems()
        return found

    def _deepspeed_problems(self) -> list[str]:
        """What DeepSpeed ZeRO cannot do here: it shards over data-parallel ranks only."""
        from parallel.deepspeed_engine import deepspeed_json_problems, read_deepspeed_json, zero_stage

        found = []
        if self.tp > 1 or self.pp > 1:
            found.append(f"parallel.engine=deepspeed runs data-parallel layouts only (ZeRO shards over the "
                         f"data-parallel ranks; tensor and pipeline parallelism are the native engine's), got "
                         f"tp={self.tp} pp={self.pp}; set parallel.tp=1 parallel.pp=1, or parallel.engine=native")
        if self.sequence_parallel:
            found.append("parallel.sequence_parallel needs tensor parallelism, which parallel.engine=deepspeed lacks; "
                         "set it to false")
        if self.param_dtype != "fp32":
            found.append("parallel.param_dtype is FSDP's; with parallel.engine=deepspeed precision comes from the "
                         "DeepSpeed JSON's bf16 section: keep parallel.param_dtype=fp32")
        json_problems = deepspeed_json_problems(self.deepspeed_config)
        if self.compile and not json_problems and zero_stage(read_deepspeed_json(self.deepspeed_config)) == 3:
            # Measured: dynamo traces into the hooks that gather each block's partitioned parameters,
            # recompiles at every call until its limit and then runs them eagerly.
            found.append(f"parallel.compile does not combine with ZeRO-3 (parallel.deepspeed_config="
                         f"{self.deepspeed_config}): its parameter-gathering hooks recompile the blocks at every "
                         "call; set parallel.compile=false, or use a ZeRO-1/2 JSON such as "
                         "configs/deepspeed/zero2.json")
        return found + json_problems

    def _compile_problems(self) -> list[str]:
        """What compiled blocks cannot be combined with yet, and whether this machine can compile."""
        from parallel.compile import compile_problems

        found = []
        if self.tp > 1:
            # Dynamo's graphs of the DTensor-sharded blocks fail in backward (a DTensor redistribute
            # meets a plain tensor); data and pipeline parallelism wrap the compiled blocks unchanged.
            found.append(f"parallel.compile does not combine with tensor parallelism yet (parallel.tp={self.tp}): "
                         "set parallel.compile=false, or parallel.tp=1 (data and pipeline parallelism work with it)")
        return found + compile_problems()

    def _pipeline_problems(self, num_layers: int) -> list[str]:
        stages = self.num_stages
        found = []
        if self.pp_layers_per_stage is not None:
            if len(self.pp_layers_per_stage) != stages:
                found.append(f"parallel.pp_layers_per_stage has {len(self.pp_layers_per_stage)} entries; it needs "
                             f"pp * pp_virtual_stages = {stages}")
            if sum(self.pp_layers_per_stage) != num_layers:
                found.append(f"parallel.pp_layers_per_stage sums to {sum(self.pp_layers_per_stage)}; it must sum to "
                             f"model.n_layers={num_layers}")
        elif self.pp > 1 and stages > 0 and num_layers % stages:  # stages < 1: reported as a range
            found.append(f"model.n_layers={num_layers} is not divisible by pp * pp_virtual_stages = {stages}; "
                         "change n_layers or give parallel.pp_layers_per_stage")
        if self.pp_schedule == "interleaved_1f1b" and self.pp > 1 and self.pp_virtual_stages < 2:
            found.append("parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2")
        if self.pp_virtual_stages > 1 and self.pp_schedule != "interleaved_1f1b":
            found.append("parallel.pp_virtual_stages > 1 needs parallel.pp_schedule=interleaved_1f1b")
        return found

    def microbatch_problems(self, microbatches: int) -> list[str]:
        """What the pipeline schedule needs of the micro-batches each rank runs per step."""
        if self.pp == 1:
            return []
        found = []
        if microbatches < self.pp:
            found.append(f"with parallel.pp={self.pp} each rank needs at least pp micro-batches per step, it has "
                         f"{microbatches}; raise data.global_batch_size or lower data.micro_batch_size")
        if self.pp_schedule == "interleaved_1f1b" and microbatches % self.pp:
            found.append(f"parallel.pp_schedule=interleaved_1f1b needs the micro-batches per step ({microbatches}) to "
                         f"be a multiple of parallel.pp={self.pp}; change data.global_batch_size or "
                         "data.micro_batch_size")
        return found

    def layers_per_stage(self, num_layers: int) -> list[int]:
        """Blocks of each pipeline stage: as configured, or an even split."""
        if self.pp_layers_per_stage is not None:
            return list(self.pp_layers_per_stage)
        return [num_layers // self.num_stages] * self.num_stages
