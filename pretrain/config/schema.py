"""The run config's sections: one typed dataclass each, a docstring under every field.

A run is one `RunConfig`. Its `model:` section is the model family's own dataclass (a
`pretrain.models.ModelConfig`, chosen by `model.family`), its `parallel:` section the parallel
library's `ParallelConfig`; the other sections are the application's and live here. Every number
declares its allowed range beside it, as field metadata (`metadata={"ge": 1}`: >= 1; keys ge, gt,
le, lt), checked by `parallel.ranges.field_problems` for every section. Reading (YAML, overrides,
types) is in parse.py, the checks in validate.py, the reference docs in docs.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from parallel.config import ParallelConfig
from pretrain.models import DEFAULT_FAMILY, ModelConfig, family_config


def _default_model() -> ModelConfig:
    return family_config(DEFAULT_FAMILY)()


@dataclass
class DiffusionConfig:
    """Noise schedule and the ProSeCo objective, switch for switch with the official code."""

    noise_schedule: Literal["loglinear", "linear", "cosine", "geometric"] = "loglinear"
    """sigma(t): loglinear (every ProSeCo run; loss weight exactly 1/t), linear, cosine, geometric."""
    schedule_eps: float = field(default=1e-3, metadata={"gt": 0, "lt": 1})
    """eps of the loglinear and cosine schedules: alpha_1 = eps, so no sequence is fully masked."""
    sigma_min: float = field(default=1e-4, metadata={"gt": 0})
    """Smallest sigma of the linear and geometric schedules (ignored by loglinear, as upstream)."""
    sigma_max: float = field(default=20.0, metadata={"gt": 0})
    """Largest sigma of the linear and geometric schedules (ignored by loglinear, as upstream)."""
    antithetic_sampling: bool = True
    """Stratify t over the global batch: sample i draws t from the i-th of B equal strata."""
    sampling_eps_training: float = field(default=0.1, metadata={"ge": 0, "lt": 1})
    """Lower bound of t in training (the released runs use 0.1: t ~ U[0.1, 1], weight <= 10)."""
    sampling_eps_validation: float = field(default=1e-3, metadata={"ge": 0, "lt": 1})
    """Lower bound of t in validation (t ~ U[1e-3, 1]), as the official code."""
    corrector_training: bool = True
    """Train the model to correct its own argmax reconstructions (ProSeCo). False: plain MDLM."""
    corrector_input: Literal["all", "masked"] = "all"
    """all: the corrector sees the model's output at every position (released runs);
    masked: model output at masked positions, clean tokens elsewhere."""
    corrector_prior: Literal["argmax", "sample"] = "argmax"
    """How the corrector input is drawn from the first pass: argmax (paper) or a categorical sample."""
    weighted_corrector_loss: bool = True
    """Weight the corrector loss by the MDLM weight dsigma/expm1(sigma) (= 1/t), as the paper."""
    corrector_errors_upweighted: bool = True
    """Released OWT run's variant: log-loss where the corrector input is wrong, -p where right."""
    mdlm_loss_weight: float = field(default=1.0, metadata={"ge": 0})
    """Scalar on the MDLM loss (the official config defaults to 0; the released runs use 1)."""
    corrector_loss_weight: float = field(default=1.0, metadata={"ge": 0})
    """Scalar on the corrector loss (the official config defaults to 0; the released runs use 1)."""
    corrector_training_start_step: int = field(default=0, metadata={"ge": -1})
    """Train plain MDLM before this optimizer step, then the joint loss (0 or -1: from the start)."""
    loss_chunk_tokens: int = field(default=512, metadata={"ge": 0})
    """The losses, pass 1's argmax and the corrector loss are computed from the model's final
    features this many tokens at a time, the output projection fused in and its logits recomputed
    in backward, so no B x L x vocabulary tensor is ever held (same loss and gradients). 0: the
    model returns the whole logits, as the sampler needs them."""
    cond_dropout: float = field(default=0.1, metadata={"ge": 0, "lt": 1})
    """With data.labels (classifier-free guidance): the probability that a training sample's label
    is replaced by the null class, which trains the unconditional model beside the conditional one
    (0.1, the paper's QM9 runs). Drawn from the sample's position, the same on every layout."""


@dataclass
class DataConfig:
    """Token shards and how they are streamed."""

    shards: str = "data/shakespeare/shards"
    """Folder written by `proseco tokenizer shard` (manifest.json, train/ and val/ shards): a local
    path or any URL fsspec reads (s3://, gs://, az://, https://, hf://); credentials come from the
    environment (docs/data.md)."""
    global_batch_size: int = field(default=32, metadata={"ge": 1})
    """Sequences per optimizer step, summed over data-parallel ranks and accumulation steps."""
    micro_batch_size: int = field(default=32, metadata={"ge": 1})
    """Sequences per forward pass on one data-parallel rank."""
    num_workers: int = field(default=1, metadata={"ge": 0})
    """DataLoader worker processes per rank (0 reads in the training process)."""
    shuffle: bool = True
    """Shuffle shard order and rotate within shards each epoch (seeded; exact on resume)."""
    max_corrupt_fraction: float = field(default=0.01, metadata={"ge": 0, "lt": 1})
    """Fail when more than this fraction of samples in a shard, or of shards, is unreadable."""
    verify_shards: bool = True
    """Hash each shard before a process first reads it and compare with the manifest's sha256:
    altered bytes make the shard's samples invalid. Off skips the hash (one sequential read per
    shard and process); the per-sample header and vocabulary checks remain."""
    prefetch: int = field(default=8, metadata={"ge": 0})
    """Micro-batches each reading process (DataLoader worker) fetches ahead, each in its own thread:
    hides the latency of a remote folder (memory: this many micro-batches of tokens per worker)."""
    read_timeout_s: float = field(default=60.0, metadata={"gt": 0})
    """Limit of one request to a remote folder (http and s3 clients)."""
    read_retries: int = field(default=5, metadata={"ge": 0})
    """Attempts after the first failed one for a remote read; the run stops with the URL named after the last."""
    read_backoff_s: float = field(default=1.0, metadata={"ge": 0})
    """Wait before the first retry, doubling with every further one (capped at 30 s)."""
    labels: str | None = None
    """Train on class labels for classifier-free guidance: the name of a label set beside the
    shards (labels/NAME/, written by `proseco label SHARDS --property NAME`); model.num_classes
    comes from its labels.json. null: no labels (an unconditional model)."""


@dataclass
class OptimConfig:
    """AdamW, learning-rate schedule, clipping and EMA (defaults: the paper's OWT run)."""

    lr: float = field(default=3e-4, metadata={"gt": 0})
    """Peak learning rate."""
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"ge": 0, "lt": 1})
    """AdamW betas."""
    eps: float = field(default=1e-8, metadata={"gt": 0})
    """AdamW epsilon (above 0: a parameter whose gradient is exactly 0, such as the embedding row of a
    padding token, would otherwise be updated by 0/0 = NaN)."""
    weight_decay: float = field(default=0.0, metadata={"ge": 0})
    """AdamW decoupled weight decay."""
    implementation: Literal["fused", "for-loop"] = "fused"
    """fused: torch's fused AdamW, one kernel per parameter tensor for the weight and both moments
    (CPU and CUDA; its step takes 0.40 of for-loop's on CPU, benchmarks/optimizer.py); for-loop: torch's
    reference loop, op by op (what the official code runs on CPU). The two agree to the last bit or
    two; each is exact across layouts and resumes bit for bit."""
    warmup_steps: int = field(default=2500, metadata={"ge": 0})
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant (OWT run) or cosine decay to min_lr_ratio * lr at train.max_steps."""
    min_lr_ratio: float = field(default=0.01, metadata={"ge": 0, "le": 1})
    """Floor of the cosine schedule as a fraction of lr."""
    grad_clip: float = field(default=1.0, metadata={"ge": 0})
    """Clip the global gradient norm to this value (0 disables clipping)."""
    ema_decay: float = field(default=0.9999, metadata={"ge": 0, "lt": 1})
    """EMA of the weights, with warm-up min(decay, (1+n)/(10+n)); 0 disables. Evaluation and
    sampling use the EMA weights."""


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = field(default=1000, metadata={"ge": 1})
    """Optimizer steps to train for."""
    seed: int = field(default=1, metadata={"ge": 0})
    """Seeds initialisation, masking, noise levels and data order."""
    step_mode: Literal["two_pass", "reuse"] = "reuse"
    """two_pass: a no-grad forward builds the corrector input, then one forward of both halves;
    reuse: the graded forward of z_t also gives the argmax (the official code's cost)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the blocks (weights and LayerNorm stay fp32). fp32 is exact and is the
    default on CPU, where bf16 backward is about five times slower."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks CUDA when available."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/Inf loss or gradient never reaches the weights: stop the run, or skip the step."""
    max_skipped_steps: int = field(default=10, metadata={"ge": 1})
    """With on_nonfinite=skip, stop after this many consecutive skipped steps."""
    stop_file: str | None = None
    """A file whose appearance asks for a checkpoint and a clean exit (code 75), as a preemption
    signal does: for launchers that cannot pass signals to every node (DeepSpeed's pdsh/ssh;
    slurm/train-deepspeed.sbatch creates it when Slurm signals the job). Checked every step."""
    eval_every: int = field(default=200, metadata={"ge": 0})
    """Validate every this many steps (0: only at the end)."""
    eval_batches: int = field(default=8, metadata={"ge": 0})
    """Validation batches of data.global_batch_size samples per evaluation (0: the whole split):
    the split's first eval_batches x global_batch_size samples, the same on every layout."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (DCP), atomic and reshardable."""

    every: int = field(default=500, metadata={"ge": 0})
    """Save every this many steps (0: only at the end and on preemption)."""
    keep_last: int = field(default=3, metadata={"ge": 1})
    """Keep this many most recent checkpoints."""
    keep_every: int = field(default=0, metadata={"ge": 0})
    """Also keep, permanently, the checkpoints of steps that are multiples of this (0: none), e.g.
    for comparisons at equal training FLOPs or for annealing from a mid-run state."""
    resume: str = "auto"
    """auto: continue from the newest checkpoint in the run folder that passes its checks, if any
    (damaged newer ones are skipped, and logged with why); none: start fresh (fails if the run
    folder holds checkpoints); or a checkpoint path (which must pass: no fallback)."""
    async_save: bool = False
    """Write checkpoints in the background while training continues."""
    verify: Literal["digest", "size"] = "digest"
    """How a checkpoint is checked before a resume loads it: digest (sizes, DCP metadata and the
    SHA-256 of every file against the manifest written at save time) or size (sizes and DCP
    metadata only: faster for huge checkpoints, but flipped bytes go unnoticed). Digests are
    always written; no mode ever runs code from a checkpoint."""


@dataclass
class LoggingConfig:
    """Where and how a run reports."""

    run_dir: str = "runs/default"
    """Run folder: resolved config, metrics.jsonl, checkpoints/, plots, samples."""
    log_every: int = field(default=10, metadata={"ge": 1})
    """Write training metrics every this many steps."""
    progress: bool = True
    """Rank-0 progress bar with loss, tokens/s and ETA."""
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    """Weights & Biases mode (offline and disabled need no network)."""
    wandb_project: str = "proseco-pretrain"
    """Weights & Biases project."""


@dataclass
class SamplingConfig:
    """The ProSeCo sampler (MDLM ancestral sampling with corrector loops)."""

    steps: int = field(default=64, metadata={"ge": 1})
    """Unmasking steps T."""
    num_samples: int = field(default=16, metadata={"ge": 1})
    """Samples drawn at the end of training and by `proseco sample` by default."""
    batch_size: int = field(default=16, metadata={"ge": 1})
    """Samples generated at once."""
    nucleus_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    """Top-p applied to every distribution the sampler draws from (1.0 disables)."""
    nucleus_cache: Literal["once", "official"] = "once"
    """With nucleus_p < 1 and the cache: `once` filters every distribution once, also when a
    step reuses the last forward; `official` filters the cached, already filtered probabilities
    again at every reuse, as the official sampler does, which sharpens draws when T exceeds the
    tokens to unmask (docs/method.md)."""
    unmasking: Literal["posterior", "confidence"] = "posterior"
    """Which masked positions a (non-block) step unmasks: `posterior`, MDLM's reverse process
    (each independently with probability 1 - mc_s/mc_t); `confidence`, as many as the schedule
    expects, those whose drawn token is most probable (LLaDA's low-confidence remasking)."""
    float64: bool = True
    """Sample from float64 probabilities (avoids the low-precision Gumbel bias)."""
    use_cache: bool = True
    """Reuse the last forward when the input did not change (no NFE spent)."""
    corrector_steps: int = field(default=0, metadata={"ge": 0})
    """Corrector iterations per loop S (0: plain MDLM sampling)."""
    corrector_every: int = field(default=1, metadata={"ge": 1})
    """Run a corrector loop after every this many unmasking steps (omega)."""
    corrector_start_iter: int = field(default=0, metadata={"ge": 0})
    """Run corrector loops only from this unmasking step on."""
    corrector_sampling: Literal["argmax", "sample", "select_top_k"] = "argmax"
    """How each corrector iteration updates the sequence."""
    corrector_top_k: int = field(default=0, metadata={"ge": 0})
    """With select_top_k: change at most this many positions per iteration."""
    corrector_prior: Literal["argmax", "sample"] = "argmax"
    """Initial corrector input: argmax of the denoiser, or a sample from it."""
    denoise_final: bool = False
    """Fill masks left after the last step with the argmax (off, as the official sampler)."""
    block_length: int | None = field(default=None, metadata={"ge": 1})
    """Semi-autoregressive blocks of this length with low-confidence unmasking (None: off)."""
    temperature: float = field(default=0.0, metadata={"ge": 0})
    """Block mode: 0 unmasks the argmax (greedy, as LLaDA's harness), > 0 samples at this temperature."""
    early_eos_stop: bool = False
    """Block mode: a sample whose finished block ends in EOS stops there, its remaining masks
    filled with EOS and no further forwards spent (LLaDA's harness stops so; its NFEs count so)."""
    seed: int = field(default=0, metadata={"ge": 0})
    """Seed of the sampler's random draws."""
    label: int | None = field(default=None, metadata={"ge": 0})
    """Class to sample (a model trained with data.labels; 0..model.num_classes-1). null: the
    unconditional model (the null class)."""
    guidance: float = field(default=1.0, metadata={"ge": 0})
    """Classifier-free guidance scale gamma (with sampling.label): the denoiser's log-probabilities
    are gamma * conditional + (1 - gamma) * unconditional, renormalised (the official code's
    formula): 1 is the conditional model alone (one forward), 0 the unconditional one, above 1
    pushes towards the label (the paper's QM9 figure: 1..5). The corrector always uses the
    conditional model."""


@dataclass
class RunConfig:
    """A whole run. YAML top-level keys are these sections."""

    name: str = "default"
    """Run name (used by logging backends)."""
    model: ModelConfig = field(default_factory=_default_model)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
