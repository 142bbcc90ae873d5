"""Our training step against the official ProSeCo code's (kuleshov-group/proseco), side by side
in one process: the same weights, batch, threads and AdamW settings, at the step benchmark's
shape, from paired rounds in alternating order (benchmarks/stats.py). The official code is not
part of this repository: `make bench` runs this only when OFFICIAL_PROSECO names a checkout of it
(and OFFICIAL_PYTHON, if set, a Python with lightning, hydra-core, omegaconf, torchmetrics,
transformers and einops besides this project's requirements); otherwise it reports it skipped.
Its two flash-attn calls are replaced at run time by PyTorch's SDPA and a plain rotary.

    python -m benchmarks.official --official /path/to/proseco [--min-rounds 16] [--budget-s 300]

(under `make bench`: BENCH_MIN_ROUNDS, BENCH_MAX_ROUNDS, BENCH_BUDGET_S, as benchmarks/step.py).

What is compared. One training step on each side: forward, backward, AdamW step, zero_grad; no
gradient clipping and no EMA on either side (Lightning's optimizer hooks, which add both, are
not in the loop). Ours: `pretrain.step.forward_backward` through a LocalRunner in reuse and in
two_pass mode, and plain MDLM, with its default fused AdamW (optim.implementation); the reuse
step also with torch's for-loop AdamW, the one the official code gets on CPU, so that the
optimizer's share of the difference shows. Theirs: the real `diffusion.Diffusion` LightningModule's
`training_step` (noise, masking, both passes, the loss, its torchmetrics updates), then
`loss.backward()` and the optimizer of its own `configure_optimizers`; it is attached to a
`lightning.Trainer(barebones=True)` so that `self.trainer` resolves and `self.log` returns at
once. Its config is the released OWT run's objective (scripts/train_owt_mdlm_corrector.sh:
parameterization d3pm with subs_masking, T=0, the model's outputs as corrector input by argmax,
weighted and error-upweighted corrector loss, both loss weights 1) at our model's sizes.

The weights: our DiT is built and initialised as benchmarks/step.py does it, exported through
this project's conversion code (`pretrain.convert.layouts.to_folder`, the paper's layout, i.e.
the names of the released checkpoints) and loaded strictly into the official backbone. Before
timing, one step on each side on the same batch, with the official noise levels t and masks z_t
set to ours (its `_sample_t` and `_q_xt` answered from ours on the instance), must give the same
total, MDLM and corrector losses and the same gradients (relative 1e-5); the script stops if not.

Where the time goes. After the timed rounds, a few steps of each reuse step run under
torch.profiler; the kernels both sides run on the same shapes (the GEMMs, SDPA, GELU) give
`ours_over_official_shared_kernels_reuse` (1 when the work is the same), each side's share of its
step in them, and `floor_ours_over_official_reuse`: our time in those kernels over the official
step's, the ratio ours / official that would remain if everything else in our step took no time.
benchmarks/gemm_rate.py measures how close the GEMMs, most of those kernels' time, already run to
this machine's peak: near 1, the floor does not move without fewer FLOPs, and the official step
does the same FLOPs.

The official plain-MDLM step (corrector_training=False) fails in backward: its continuous-time
branch applies `_subs_parameterization`, which writes in place, to the output of a log_softmax
that autograd saved. That failure is reported as it is; the MDLM ratio is then measured with the
one change that lets it run, a copy of the logits before that call (about 1 MB at this shape,
against a step of ~100 MB of activations), and the row says so.

Run-time changes to the official code (its files are never edited):
- `flash_attn` is a module made here: `flash_attn.layers.rotary.apply_rotary_emb_qkv_` rotates
  q and k by halves (flash-attn's non-interleaved rotary, out of place), and
  `flash_attn.flash_attn_interface.flash_attn_varlen_qkvpacked_func` runs
  `F.scaled_dot_product_attention` on equal-length sequences (all the DiT ever passes).
- Modules the training step never reaches and that do not install on a CPU machine (mamba_ssm,
  causal_conv1d; timm and datasets when absent) are stubs whose objects raise when used.
- The official checkout goes at the end of sys.path, so this project's own `tokenizer` package
  keeps its name.

A scratch environment for it (never this project's .venv):

    git clone https://github.com/kuleshov-group/proseco /tmp/official-proseco
    python -m venv /tmp/official-venv
    /tmp/official-venv/bin/pip install torch==2.13.0   # the CPU build where the index has it
    /tmp/official-venv/bin/pip install lightning hydra-core omegaconf torchmetrics transformers einops \
        numpy pyyaml safetensors sentencepiece rich fsspec
    OFFICIAL_PROSECO=/tmp/official-proseco OFFICIAL_PYTHON=/tmp/official-venv/bin/python make bench
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gemm_rate import kernel_seconds
from benchmarks.stats import TOO_WIDE, Rounds, add_round_arguments, paired_rounds, ratio_row, setting
from benchmarks.step import CONFIG, SEQ_LEN, VOCAB, _batch, _objective
from parallel.compile import apply_compile
from parallel.runner import LocalRunner
from pretrain.config import load_config
from pretrain.convert.layouts import PAPER, to_folder
from pretrain.diffusion import sample_t
from pretrain.models import ModelShape, get_family
from pretrain.models.dit.model import DiT
from pretrain.optim import build_optimizer
from pretrain.step import forward_backward

ROOT = Path(__file__).resolve().parents[1]
MASK_ID = 4  # as benchmarks/step.py
MIN_ROUNDS = setting("BENCH_MIN_ROUNDS", 16)
MAX_ROUNDS = setting("BENCH_MAX_ROUNDS", 100)
BUDGET_S = setting("BENCH_BUDGET_S", 300.0)
WARMUP = setting("BENCH_WARMUP", 2)  # untimed rounds first
LOSS_RTOL = 1e-5
CHECK_HEAD_STD = 1.0  # the output projection's init in the same-step check (logits a few units apart)
GPU_ONLY_MODULES = ("mamba_ssm", "causal_conv1d")  # stubbed always: they only build with CUDA
UNUSED_MODULES = ("timm", "datasets")  # stubbed when not installed: data loading and schedulers only
ENV_CHECKOUT, ENV_PYTHON = "OFFICIAL_PROSECO", "OFFICIAL_PYTHON"
# The kernels both sides run on the same shapes: the projections' GEMMs, attention and GELU.
SHARED_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::gelu", "aten::gelu_backward")
SHARED_KERNEL_PREFIX = "aten::_scaled_dot_product"
PROFILED_ROUNDS = setting("BENCH_PROFILED_ROUNDS", 4)  # after the timed rounds
PROFILED_STEPS = setting("BENCH_PROFILED_STEPS", 2)  # per side and round


# ---------------------------------------------------------------------------------------------
# Importing the official code on a CPU


def _rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """flash-attn's apply_rotary_emb_qkv_ (non-interleaved) out of place: qkv [B, S, 3, H, D],
    cos and sin [S, D/2]; q and k rotated by halves, v unchanged."""
    cos = torch.cat([cos, cos], dim=-1)[None, :, None, :]
    sin = torch.cat([sin, sin], dim=-1)[None, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    return torch.stack([rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]], dim=2)


def _varlen_qkvpacked(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float = 0.0,
                      softmax_scale: float | None = None, causal: bool = False, **_) -> torch.Tensor:
    """flash_attn_varlen_qkvpacked_func for sequences of equal length: qkv [B*S, 3, H, D] ->
    [B*S, H, D] through SDPA."""
    total, _, heads, head_dim = qkv.shape
    if not bool((cu_seqlens.diff() == max_seqlen).all()):
        raise NotImplementedError("the SDPA stand-in for flash-attn takes sequences of equal length only")
    q, k, v = qkv.reshape(-1, max_seqlen, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).reshape(total, heads, head_dim)


def _flash_attn_modules() -> dict[str, types.ModuleType]:
    # With a spec (transformers asks for one) but no version or file: libraries that probe for
    # flash-attn see it as not installed.
    names = ("flash_attn", "flash_attn.layers", "flash_attn.layers.rotary", "flash_attn.flash_attn_interface")
    modules = {name: importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None)) for name in names}
    modules["flash_attn.layers.rotary"].apply_rotary_emb_qkv_ = _rotary_qkv
    modules["flash_attn.flash_attn_interface"].flash_attn_varlen_qkvpacked_func = _varlen_qkvpacked
    modules["flash_attn"].layers = modules["flash_attn.layers"]
    modules["flash_attn.layers"].rotary = modules["flash_attn.layers.rotary"]
    modules["flash_attn"].flash_attn_interface = modules["flash_attn.flash_attn_interface"]
    modules["flash_attn"].__path__ = []
    modules["flash_attn.layers"].__path__ = []
    return modules


class _StubModule(types.ModuleType):
    """A module whose every attribute is a class that raises when instantiated or called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        where = f"{self.__name__}.{name}"

        def unavailable(*args, **kwargs):
            raise ImportError(f"{where} is a stub (benchmarks/official.py): not installed on this machine")

        stub = type(name, (), {"__init__": unavailable, "__call__": unavailable, "__module__": self.__name__})
        setattr(self, name, stub)
        return stub


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `_StubModule`s for the packages `roots` and everything under them."""

    def __init__(self, roots: tuple[str, ...]):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_official(checkout: Path) -> types.ModuleType:
    """The official `diffusion` module, imported from `checkout` with the stand-ins above."""
    if not (checkout / "diffusion.py").is_file() or not (checkout / "models" / "dit.py").is_file():
        raise SystemExit(f"{checkout} is not a checkout of kuleshov-group/proseco (no diffusion.py, models/dit.py)")
    missing = [name for name in ("lightning", "hydra", "omegaconf", "torchmetrics", "transformers", "einops")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"the official code needs {', '.join(missing)} in this Python ({sys.executable}); install "
                         f"them in a scratch environment and set {ENV_PYTHON} to its python (see "
                         "benchmarks/official.py)")
    sys.modules.update(_flash_attn_modules())
    stubbed = GPU_ONLY_MODULES + tuple(name for name in UNUSED_MODULES if importlib.util.find_spec(name) is None)
    sys.meta_path.insert(0, _StubFinder(stubbed))
    sys.path.append(str(checkout))  # last: this project's packages keep their names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("diffusion")


# ---------------------------------------------------------------------------------------------
# The two sides


def official_config(cfg, seq_len: int, corrector: bool):
    """An OmegaConf config for the official Diffusion module: the released OWT run's objective
    (scripts/train_owt_mdlm_corrector.sh) at our model's sizes and optimizer."""
    import omegaconf

    model, diffusion, optim = cfg.model, cfg.diffusion, cfg.optim
    return omegaconf.OmegaConf.create({
        "mode": "train", "diffusion": "absorbing_state", "backbone": "dit", "parameterization": "d3pm",
        "subs_masking": True, "time_conditioning": model.time_conditioning, "zero_recon_loss": False, "T": 0,
        "is_vision": False, "corrector_training": corrector,
        "use_model_outputs_as_corrector_input": diffusion.corrector_input == "all",
        "use_model_argmax_output": True, "use_argmax_for_corrector": diffusion.corrector_prior == "argmax",
        "use_weighted_corrector_loss": diffusion.weighted_corrector_loss,
        "corrector_loss_errors_upweighted": diffusion.corrector_errors_upweighted,
        "corrector_training_start_step": diffusion.corrector_training_start_step,
        "mdlm_loss_weight": diffusion.mdlm_loss_weight, "corrector_loss_weight": diffusion.corrector_loss_weight,
        "model": {"name": "bench", "type": "ddit", "hidden_size": model.d_model, "cond_dim": model.cond_dim,
                  "length": seq_len, "n_blocks": model.n_layers, "n_heads": model.n_heads, "scale_by_sigma": True,
                  "dropout": model.dropout, "tie_word_embeddings": False},
        "noise": {"type": diffusion.noise_schedule, "sigma_min": diffusion.sigma_min,
                  "sigma_max": diffusion.sigma_max},
        "training": {"ema": 0, "antithetic_sampling": diffusion.antithetic_sampling, "importance_sampling": False,
                     "sampling_eps_training": diffusion.sampling_eps_training,
                     "sampling_eps": diffusion.sampling_eps_validation, "change_of_variables": False,
                     "compute_loss_on_pad_tokens": False, "use_simple_ce_loss": False, "guidance": None},
        "optim": {"weight_decay": optim.weight_decay, "lr": optim.lr, "beta1": optim.betas[0],
                  "beta2": optim.betas[1], "eps": optim.eps},
        "lr_scheduler": {"_target_": "transformers.get_constant_schedule_with_warmup", "num_warmup_steps": 0},
        "data": {"label_col": None, "num_classes": 0},
    })


class _Tokenizer:
    """What the official module reads of its tokenizer: the vocabulary and the mask token."""

    vocab_size, mask_token, mask_token_id, pad_token_id = VOCAB, "[MASK]", MASK_ID, 0


@dataclasses.dataclass
class Official:
    module: object
    optimizer: torch.optim.Optimizer


def build_official(diffusion, lightning, cfg, weights: dict[str, torch.Tensor], corrector: bool) -> Official:
    """The official LightningModule with our weights (through the conversion code's names)."""
    module = diffusion.Diffusion(official_config(cfg, SEQ_LEN, corrector), tokenizer=_Tokenizer())
    model_cfg = dataclasses.replace(cfg.model, vocab_size=VOCAB, seq_len=SEQ_LEN)
    tensors = to_folder(get_family(model_cfg.family), model_cfg, weights, PAPER)
    prefix = "backbone."
    if any(not name.startswith(prefix) for name in tensors):
        raise SystemExit(f"the conversion code gave names outside {prefix!r}: {sorted(tensors)[:3]} ...")
    module.backbone.load_state_dict({name[len(prefix):]: t.clone() for name, t in tensors.items()}, strict=True)
    module.train()
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):  # its banners about devices, tips
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = lightning.Trainer(accelerator="cpu", devices=1, barebones=True, logger=False,
                                    enable_checkpointing=False)
    module.trainer = trainer
    (optimizer,), _ = module.configure_optimizers()
    trainer.optimizers = [optimizer]
    return Official(module, optimizer)


def _official_step(official: Official, batch: dict) -> torch.Tensor:
    loss = official.module.training_step(batch, 0)
    loss.backward()
    official.optimizer.step()
    official.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _our_step(model, optimizer, batch: dict, objective, mode: str):
    metrics = forward_backward(LocalRunner(model), [batch], objective, step=0, mode=mode,
                               backward_scale=1.0 / batch["tokens"].numel())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics


def _official_batch(batch: dict) -> dict:
    return {"input_ids": batch["tokens"], "attention_mask": torch.ones_like(batch["tokens"])}


def shared_kernel_seconds(step, steps: int) -> float:
    """Seconds per step in the shared kernels, by torch's profiler over `steps` steps (their self
    CPU time)."""
    return kernel_seconds(step, steps, lambda key: key in SHARED_KERNELS or key.startswith(SHARED_KERNEL_PREFIX))


def kernel_rounds(cases: dict, names: tuple[str, str], rounds: int = PROFILED_ROUNDS,
                  steps: int = PROFILED_STEPS) -> dict[str, float]:
    """Median over rounds of the seconds per step in the shared kernels, for each side; sides
    alternate in order every round. Only the kernels' own times are taken from the profile: the
    profiler's cost per operator would inflate the total of the side with more small operators, and
    steps timed right after a profile ran 1.5-1.7x slower here than in the paired rounds, so step
    times come from the unprofiled paired rounds."""
    out: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):
            out[name].append(shared_kernel_seconds(cases[name], steps))
    return {name: statistics.median(values) for name, values in out.items()}


def _our_model(cfg, head_std: float | None = None):
    """Our DiT with benchmarks/step.py's weights (non-zero, as after training); `head_std` redraws
    the output projection wider, so that no two logits of a token tie to within rounding."""
    torch.manual_seed(0)
    model = DiT(cfg.model, ModelShape(VOCAB, SEQ_LEN))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        if head_std is not None:
            model.output_layer.linear.weight.normal_(0, head_std)
    return model


# ---------------------------------------------------------------------------------------------
# The correctness check: same weights, batch, t and z_t -> same losses and gradients


def check_same_step(cfg, diffusion, lightning, corrector: bool, micro: int, mode: str = "reuse") -> dict:
    """One step of each on the same batch with the official t and z_t set to ours; raises unless
    losses and gradients agree. Returns the losses (per token) of both.

    The output projection is drawn wider here (CHECK_HEAD_STD): with the timing's small weights,
    two logits of a token can tie to within rounding, and the two codes' argmaxes (ours over the
    logits, theirs over their log_softmax) then pick different corrector inputs y there, which
    changes the gradients of the whole sequence by a few percent while the loss hardly moves."""
    model = _our_model(cfg, head_std=CHECK_HEAD_STD)
    weights = {name: p.detach().clone() for name, p in model.state_dict().items()}
    official = build_official(diffusion, lightning, cfg, weights, corrector)
    if not corrector:
        _copy_before_subs(official.module)
    batch, objective = _batch(micro), _objective(corrector, micro)
    noised = objective.noise(batch, training=True)
    t = sample_t(objective.seed, batch["position"], objective.global_batch_size, cfg.diffusion.sampling_eps_training,
                 cfg.diffusion.antithetic_sampling)
    official.module._sample_t = lambda n: t.clone()
    official.module._q_xt = lambda x, move_chance: noised.zt.clone()
    metrics = forward_backward(LocalRunner(model), [batch], objective, step=0, mode=mode,
                               backward_scale=1.0 / batch["tokens"].numel())
    ours = metrics.per_token(metrics.tokens)
    losses = official.module._compute_loss(_official_batch(batch), prefix="train")
    losses.loss.backward()
    theirs = {"loss": losses.loss.item()}
    if corrector:
        theirs.update(mdlm_nelbo=losses.mdlm_loss.item(), corrector_nll=losses.corrector_loss.item())
    for name, value in theirs.items():
        if abs(value - ours[name]) > LOSS_RTOL * max(1.0, abs(value)):
            raise SystemExit(f"{name}: ours {ours[name]:.8f}, official {value:.8f} on the same weights, batch, t and "
                             "z_t: the comparison would not time the same computation")
    our_grads = {name: p.grad for name, p in model.named_parameters()}
    model_cfg = dataclasses.replace(cfg.model, vocab_size=VOCAB, seq_len=SEQ_LEN)
    mapped = to_folder(get_family(model_cfg.family), model_cfg, our_grads, PAPER)
    worst, worst_name = 0.0, ""
    for name, p in official.module.backbone.named_parameters():
        ours_grad, their_grad = mapped["backbone." + name], p.grad
        scale = their_grad.abs().max().clamp_min(1e-12)
        difference = ((ours_grad - their_grad).abs().max() / scale).item()
        worst, worst_name = max((worst, worst_name), (difference, name))
    if worst > LOSS_RTOL:
        raise SystemExit(f"gradients differ by {worst:.2e} (relative to the tensor's largest, at {worst_name}) on the "
                         "same step")
    return {"ours": {k: ours[k] for k in theirs}, "official": theirs, "grad_max_rel_diff": worst}


def _copy_before_subs(module) -> None:
    """The one change that lets the official plain-MDLM step run backward: `_subs_parameterization`
    gets a copy of the logits instead of writing into a log_softmax output autograd saved."""
    original = module._subs_parameterization
    module._subs_parameterization = lambda logits, xt: original(logits.clone(), xt)


def official_mdlm_failure(cfg, diffusion, lightning, micro: int) -> str | None:
    """The error of one unmodified official plain-MDLM step, or None when it runs."""
    model = _our_model(cfg)
    official = build_official(diffusion, lightning, cfg, dict(model.state_dict()), corrector=False)
    try:
        _official_step(official, _official_batch(_batch(micro)))
    except RuntimeError as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


# ---------------------------------------------------------------------------------------------
# Timing


def measure(checkout: Path, min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS, budget_s: float = BUDGET_S,
            threshold: float = TOO_WIDE) -> list[dict]:
    diffusion = import_official(checkout)
    import lightning

    cfg = load_config(CONFIG)
    if cfg.model.mlp_ratio != 4 or cfg.model.rope_base != 1e4:
        raise SystemExit("the official DiT fixes mlp_ratio=4 and rope_base=1e4; the benchmark config differs")
    micro = cfg.data.micro_batch_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checks = {"reuse": check_same_step(cfg, diffusion, lightning, True, micro, "reuse"),
                  "two_pass": check_same_step(cfg, diffusion, lightning, True, micro, "two_pass"),
                  "mdlm": check_same_step(cfg, diffusion, lightning, False, micro)}
        failure = official_mdlm_failure(cfg, diffusion, lightning, micro)
    for name, check in checks.items():
        print(f"same step, {name}: ours {check['ours']}, official {check['official']}, gradients within "
              f"{check['grad_max_rel_diff']:.1e}", file=sys.stderr)
    print(f"official plain MDLM unmodified: {failure or 'runs'}", file=sys.stderr)

    model = _our_model(cfg)
    weights = {name: p.detach().clone() for name, p in model.state_dict().items()}
    optimizer = build_optimizer(model, cfg.optim)
    for_loop = _our_model(cfg)  # the same step with the official code's AdamW implementation
    for_loop_optimizer = build_optimizer(for_loop, dataclasses.replace(cfg.optim, implementation="for-loop"))
    official = build_official(diffusion, lightning, cfg, weights, corrector=True)
    official_mdlm = build_official(diffusion, lightning, cfg, weights, corrector=False)
    # Ours with parallel.compile (each block through the inductor; compiled in the warm-up rounds).
    compiled = _our_model(cfg)
    apply_compile(compiled.blocks.values())
    compiled_optimizer = build_optimizer(compiled, cfg.optim)
    if failure:
        _copy_before_subs(official_mdlm.module)
    batch, official_batch = _batch(micro), _official_batch(_batch(micro))
    objectives = {True: _objective(True, micro), False: _objective(False, micro)}
    cases = {
        "ours_reuse": lambda: _our_step(model, optimizer, batch, objectives[True], "reuse"),
        "ours_reuse_for_loop": lambda: _our_step(for_loop, for_loop_optimizer, batch, objectives[True], "reuse"),
        "ours_reuse_compiled": lambda: _our_step(compiled, compiled_optimizer, batch, objectives[True], "reuse"),
        "official_reuse": lambda: _official_step(official, official_batch),
        "ours_two_pass": lambda: _our_step(model, optimizer, batch, objectives[True], "two_pass"),
        "ours_mdlm": lambda: _our_step(model, optimizer, batch, objectives[False], "reuse"),
        "official_mdlm": lambda: _official_step(official_mdlm, official_batch),
    }
    pairs = [("ours_reuse", "official_reuse"), ("ours_reuse_for_loop", "official_reuse"),
             ("ours_reuse_compiled", "official_reuse"),
             ("ours_two_pass", "official_reuse"), ("ours_mdlm", "official_mdlm"),
             ("ours_reuse", "ours_mdlm"), ("ours_two_pass", "ours_mdlm"), ("official_reuse", "official_mdlm")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official code's torch.cuda.amp deprecation, once per call
        rounds = paired_rounds(cases, pairs, min_rounds=min_rounds, max_rounds=max_rounds, budget_s=budget_s,
                               threshold=threshold, warmup=WARMUP)
        kernels = kernel_rounds(cases, ("ours_reuse", "official_reuse"))
    return _rows(cfg, micro, rounds, checks, failure, threshold) + _kernel_rows(kernels, rounds)


def _rows(cfg, micro: int, rounds: Rounds, checks: dict, failure: str | None, threshold: float) -> list[dict]:
    check = checks["reuse"]
    setup = (f"{cfg.model.n_layers} x {cfg.model.d_model} DiT, vocab {VOCAB}, L={SEQ_LEN}, micro-batch {micro}, fp32, "
             f"{torch.get_num_threads()} threads, one step = forward, backward, AdamW (ours fused unless a row "
             "says otherwise, official for-loop), zero_grad on both sides; "
             f"official: its Diffusion LightningModule's training_step, flash-attn replaced by SDPA; same weights "
             f"(losses {check['ours']['loss']:.6f} ours vs {check['official']['loss']:.6f} official and gradients "
             f"within {max(c['grad_max_rel_diff'] for c in checks.values()):.0e} on the same batch, t and z_t); "
             f"{rounds.describe()}, order alternated every round")
    mdlm_note = (f"official plain MDLM fails in backward unmodified ({failure}); timed with a copy of the logits "
                 "before its in-place _subs_parameterization" if failure else "official plain MDLM unmodified")
    specs = [
        ("ours_over_official_reuse", "ours_reuse", "official_reuse",
         "step time ours (reuse) / official ProSeCo step; target <= 0.80"),
        ("ours_for_loop_adamw_over_official_reuse", "ours_reuse_for_loop", "official_reuse",
         "step time ours (reuse) with optim.implementation=for-loop, torch's reference AdamW as the official code "
         "runs it on CPU, / official ProSeCo step: the difference to ours_over_official_reuse is the fused AdamW's"),
        ("ours_compiled_over_official_reuse", "ours_reuse_compiled", "official_reuse",
         "step time ours (reuse, parallel.compile: blocks through torch.compile's inductor) / official ProSeCo step "
         "(eager, as it ships)"),
        ("ours_over_official_two_pass", "ours_two_pass", "official_reuse",
         "step time ours (two_pass) / official ProSeCo step (which has only the reuse form)"),
        ("ours_over_official_mdlm", "ours_mdlm", "official_mdlm",
         f"step time ours / official, plain MDLM; {mdlm_note}"),
        ("official_proseco_over_mdlm", "official_reuse", "official_mdlm",
         f"the official code's ProSeCo step / its MDLM step; floor 2.0; {mdlm_note}"),
        ("ours_reuse_over_mdlm_with_adamw", "ours_reuse", "ours_mdlm",
         "our reuse step / our MDLM step, optimizer step included, in this run; floor 2.0"),
        ("ours_two_pass_over_mdlm_with_adamw", "ours_two_pass", "ours_mdlm",
         "our two_pass step / our MDLM step, optimizer step included, in this run; floor 2.33"),
    ]
    rows = [ratio_row(name, rounds.spread(a, b), f"{what}; {setup}", threshold=threshold) for name, a, b, what in specs]
    rows.append({"name": "official_step_s_reuse", "value": round(statistics.median(rounds.times["official_reuse"]), 3),
                 "unit": "s", "what": f"the official ProSeCo step on this machine, median; {setup}"})
    return rows


def _kernel_rows(kernels: dict[str, float], rounds: Rounds) -> list[dict]:
    """Where the reuse step's time goes on each side, and what that leaves as the lowest ratio ours /
    official that removing everything but the shared kernels could reach."""
    ours_shared, official_shared = kernels["ours_reuse"], kernels["official_reuse"]
    ours_step, official_step = (statistics.median(rounds.times[name]) for name in ("ours_reuse", "official_reuse"))
    how = (f"the kernels' self CPU time by torch.profiler, median of {PROFILED_ROUNDS} rounds of {PROFILED_STEPS} "
           "steps per side (sides alternated) after the timed rounds, over the median step time of the timed "
           "rounds; shared kernels: the GEMMs (mm, addmm, bmm, baddbmm), SDPA forward and backward, GELU forward "
           "and backward, which both sides run on the same shapes")
    return [
        {"name": "ours_over_official_shared_kernels_reuse", "value": round(ours_shared / official_shared, 3),
         "unit": "ratio", "what": f"time in the shared kernels, ours (reuse) / official: equal work if 1; {how}"},
        {"name": "official_shared_kernel_share_reuse", "value": round(official_shared / official_step, 3),
         "unit": "ratio", "what": f"share of the official ProSeCo step in the shared kernels; {how}"},
        {"name": "ours_shared_kernel_share_reuse", "value": round(ours_shared / ours_step, 3), "unit": "ratio",
         "what": f"share of our reuse step (eager) in the shared kernels; {how}"},
        {"name": "floor_ours_over_official_reuse", "value": round(ours_shared / official_step, 3), "unit": "ratio",
         "what": "our shared-kernel time / the official step's time: ours / official if every other operator of "
                 f"our step (norms, modulation, rotary, the loss, AdamW, autograd's bookkeeping) took no time; {how}"},
    ]


# ---------------------------------------------------------------------------------------------
# Entry points


def run() -> list[dict]:
    """For benchmarks/run.py: in a child process of $OFFICIAL_PYTHON (default: this Python) when
    $OFFICIAL_PROSECO names a checkout; nothing (reported skipped) otherwise."""
    checkout = os.environ.get(ENV_CHECKOUT)
    if not checkout:
        print(f"  skipped: set {ENV_CHECKOUT} to a checkout of kuleshov-group/proseco (and {ENV_PYTHON} to a "
              "Python that runs it, see benchmarks/official.py) to compare against the official step", flush=True)
        return []
    python = os.environ.get(ENV_PYTHON, sys.executable)
    with tempfile.TemporaryDirectory(prefix="bench-official-") as scratch:
        out = Path(scratch) / "rows.json"
        # The child's stderr (the same-step check) shows; its stdout repeats the rows.
        subprocess.run([python, "-m", "benchmarks.official", "--official", checkout, "--json", str(out)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, default=os.environ.get(ENV_CHECKOUT),
                        help=f"a checkout of kuleshov-group/proseco (default ${ENV_CHECKOUT})")
    add_round_arguments(parser, MIN_ROUNDS, MAX_ROUNDS, BUDGET_S)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.official is None or not Path(args.official).is_dir():
        print(f"skipped: no official checkout (pass --official PATH or set {ENV_CHECKOUT}; got {args.official})")
        rows: list[dict] = []
    else:
        rows = measure(Path(args.official), args.min_rounds, args.max_rounds, args.budget_s, args.threshold)
    if args.json:
        args.json.write_text(json.dumps(rows))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
