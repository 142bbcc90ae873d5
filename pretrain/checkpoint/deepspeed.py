"""A DeepSpeed engine's checkpoint as one of ours: through DeepSpeed's universal format to DCP.

`to_dcp(src, run_dir)` runs DeepSpeed's `ds_to_universal` on the checkpoint's DeepSpeed files
(any ZeRO stage and world size: the universal format holds every parameter whole, with its fp32
weights and AdamW moments), puts those into the same model and AdamW the native engine builds,
adds the EMA (whole, or reassembled from ZeRO-3 partitions) and writes a DCP checkpoint of the
same step with the same meta.json: the native engine resumes it at any dp/tp/pp, and sampling,
evaluation, `proseco checkpoint consolidate` and the Hugging Face export read it. The DeepSpeed
engine itself resumes DCP checkpoints directly (pretrain/engines/deepspeed.py): no conversion
is needed that way.

DeepSpeed's files are pickles that it (and ds_to_universal) loads with the full unpickler, so a
DeepSpeed checkpoint is checked against its manifest's digests before anything reads it; the
universal files are then read back with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import torch

from pretrain.checkpoint.folder import DEEPSPEED_DIR, is_deepspeed_checkpoint, read_meta
from pretrain.checkpoint.integrity import require_verified
from pretrain.errors import CheckpointError

UNIVERSAL_MOMENTS = ("exp_avg", "exp_avg_sq")
DEEPSPEED_KEYS = ("engine", "zero_stage")


def universal_state(src: Path, workdir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """Every parameter's fp32 weights and AdamW moments (name -> {"fp32", "exp_avg", "exp_avg_sq"})
    and the optimizer's step count, by way of DeepSpeed's universal checkpoint under `workdir`."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = workdir / "universal"
    args = argparse.Namespace(input_folder=str(src / DEEPSPEED_DIR), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # it narrates each file
        ds_to_universal(args)
    params: dict[str, dict[str, torch.Tensor]] = {}
    step = 0
    for folder in sorted(p for p in (out / "zero").iterdir() if p.is_dir()):
        params[folder.name] = {key: _universal_value(folder / f"{key}.pt") for key in ("fp32", *UNIVERSAL_MOMENTS)
                               if (folder / f"{key}.pt").is_file()}
        if (folder / "step.pt").is_file():
            value = _universal_value(folder / "step.pt")
            step = int(value.item() if torch.is_tensor(value) else value)
    return params, step


def _universal_value(file: Path):
    """One state of one parameter: ZeRO-1/2 conversions store {"param": value, ...}, ZeRO-3 ones the value."""
    value = torch.load(file, weights_only=True)
    return value["param"] if isinstance(value, dict) else value


def saved_ema(src: Path, meta: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
    """The checkpoint's EMA as whole tensors (None if it has none)."""
    from safetensors.torch import load_file

    from parallel.deepspeed_engine import whole_from_partitions

    if not meta.get("has_ema", False):
        return None
    if meta["zero_stage"] != 3:
        return load_file(str(src / "ema" / "whole.safetensors"))
    ranks = [load_file(str(src / "ema" / f"rank_{r:05d}.safetensors")) for r in range(meta["world_size"])]
    return {name: whole_from_partitions([rank[name] for rank in ranks], shape) for name, shape in shapes.items()}


def to_dcp(src: str | Path, run_dir: str | Path) -> Path:
    """Convert the DeepSpeed checkpoint `src` into `run_dir`/checkpoints/step_XXXXXXXX (DCP)."""
    from pretrain.checkpoint.store import Checkpointer, app_state
    from pretrain.config import load_config_dict
    from pretrain.models import ModelShape, get_family
    from pretrain.optim import build_optimizer

    src = Path(src)
    if not is_deepspeed_checkpoint(src):
        raise CheckpointError(f"{src} is not a DeepSpeed engine's checkpoint (no {DEEPSPEED_DIR}/ folder)")
    require_verified(src, "digest", collective=False)  # before DeepSpeed unpickles anything
    meta = read_meta(src)
    cfg = load_config_dict(meta["config"], drop_unknown=True)
    model = get_family(cfg.model.family).build(cfg.model, ModelShape.of(cfg.model))
    optimizer = build_optimizer(model, cfg.optim)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    # Beside the output (same file system, its space): the universal copy is as large as the state.
    with tempfile.TemporaryDirectory(prefix=".universal-", dir=run_dir) as workdir:
        params, step = universal_state(src, Path(workdir))
    named = dict(model.named_parameters())
    missing = sorted(set(named) - set(params))
    if missing:
        raise CheckpointError(f"{src}: DeepSpeed's universal checkpoint lacks {missing[:3]}; was it saved with "
                              "another model config?")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(params[name]["fp32"].reshape(p.shape))
            if all(key in params[name] for key in UNIVERSAL_MOMENTS):
                optimizer.state[p] = {"step": torch.tensor(float(step)),
                                      **{key: params[name][key].reshape(p.shape).float().clone()
                                         for key in UNIVERSAL_MOMENTS}}
    ema = saved_ema(src, meta, {name: tuple(p.shape) for name, p in named.items()})
    state = app_state([model], [optimizer], ema)
    native_meta = {k: v for k, v in meta.items() if k not in (*DEEPSPEED_KEYS, "step", "saved_at", "manifest")}
    native_meta["converted_from"] = str(src)
    out = Checkpointer(Path(run_dir) / "checkpoints", keep_last=10**6)
    return out.save(int(meta["step"]), state, native_meta, {"tokenizer": src / "tokenizer"})


@contextlib.contextmanager
def readable(path: Path):
    """`path` itself for a DCP checkpoint; for a DeepSpeed one, a DCP conversion of it in a temporary
    folder for the time of the block (for reading: sampling, evaluation, consolidation, export)."""
    if not is_deepspeed_checkpoint(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="proseco-from-deepspeed-") as tmp:
        yield to_dcp(path, tmp)
