"""A checkpoint outside training: the model for sampling and evaluation, one safetensors file.

Either engine's: a DeepSpeed checkpoint is read through its DCP conversion (deepspeed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.checkpoint.folder import is_checkpoint_name, is_deepspeed_checkpoint, read_meta, step_folders
from pretrain.checkpoint.integrity import VerifyMode, require_verified
from pretrain.checkpoint.safe import dcp_load
from pretrain.errors import CheckpointError
from pretrain.files import atomic_path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder (then its newest checkpoint).

    Complete or not: a save only gives a folder its final name once it is whole, so a final-named
    folder that is not is damaged, and loading it says what is wrong (it is not silently passed over).
    """
    path = Path(path)
    if is_checkpoint_name(path) and path.is_dir():
        return path
    for folder in (path / "checkpoints", path):
        found = step_folders(folder)
        if found:
            return found[-1]
    raise CheckpointError(f"no complete checkpoint at {path}; pass a step_XXXXXXXX folder or a run folder "
                          "that holds checkpoints/")


def load_model(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True,
               verify: VerifyMode = "digest"):
    """A trained model for inference (EMA weights by default), its run config and its tokenizer.

    Reads any checkpoint (any layout it was saved from) into one process, after checking it
    (`verify`: see integrity.py); the tokenizer travels inside the checkpoint folder.
    """
    from pretrain.config import RunConfig, load_config_dict
    from pretrain.models import ModelShape, get_family
    from tokenizer.tokenizers import load_tokenizer

    path = resolve_checkpoint(path)
    if is_deepspeed_checkpoint(path):
        from pretrain.checkpoint.deepspeed import readable

        with readable(path) as converted:  # the tokenizer from `path`: the conversion is temporary
            model, cfg, _ = load_model(converted, device, use_ema, verify)
        return model, cfg, load_tokenizer(path / "tokenizer")
    # This process alone reads every shard (also inside a multi-process job), so it checks them all.
    require_verified(path, verify, collective=False)
    meta = read_meta(path)
    cfg: RunConfig = load_config_dict(meta["config"], drop_unknown=True)
    model = get_family(cfg.model.family).build(cfg.model, ModelShape.of(cfg.model))
    weights = dict(model.named_parameters())
    key = "ema" if use_ema and meta.get("has_ema", False) else "model"
    dcp_load({key: weights}, path, no_dist=True)
    return model.to(device).eval(), cfg, load_tokenizer(path / "tokenizer")


def consolidate(path: str | Path, out: str | Path) -> Path:
    """One safetensors file with the full weights of a checkpoint saved on any layout: the raw
    weights under their parameter names, the EMA under "ema.<name>", and the run config and step
    in the file's metadata."""
    from safetensors.torch import save_file

    path = resolve_checkpoint(path)
    if is_deepspeed_checkpoint(path):
        from pretrain.checkpoint.deepspeed import readable

        with readable(path) as converted:
            return consolidate(converted, out)
    model, cfg, _ = load_model(path, use_ema=False)  # checks the checkpoint
    meta = read_meta(path)
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    if meta.get("has_ema", False):
        shadow = {name: torch.empty_like(p) for name, p in tensors.items()}
        dcp_load({"ema": shadow}, path, no_dist=True)
        tensors.update({f"ema.{name}": t for name, t in shadow.items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"config": json.dumps(meta["config"]), "step": str(meta["step"]),
                                              "vocab_size": str(cfg.model.vocab_size)})
    return out
