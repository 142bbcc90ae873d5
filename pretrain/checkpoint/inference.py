"""A checkpoint outside training: the model for sampling and evaluation, one safetensors file.

Either engine's: a DeepSpeed checkpoint is read through its DCP conversion (deepspeed.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from pretrain.checkpoint.folder import (
    DCP_METADATA,
    is_checkpoint_name,
    is_deepspeed_checkpoint,
    read_meta,
    step_folders,
)
from pretrain.checkpoint.integrity import VerifyMode, require_verified
from pretrain.checkpoint.safe import dcp_load, read_dcp_metadata
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


def stored_shapes(path: Path, key: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the DCP checkpoint at `path` holds under `key` ("model", "ema")."""
    stored = read_dcp_metadata(path / DCP_METADATA).state_dict_metadata
    prefix = key + "."
    return {name[len(prefix):]: tuple(item.size) for name, item in stored.items()
            if name.startswith(prefix) and isinstance(item, TensorStorageMetadata)}


Upgrade = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""A model family's `upgrade_state` for one config: older parameter names -> today's."""


def renamed_since(path: Path, key: str, names: list[str], upgrade: Upgrade) -> bool:
    """Whether the checkpoint at `path` holds the parameters `names` under the names of an earlier
    version (what `upgrade` maps onto today's) rather than under `names` themselves."""
    stored = stored_shapes(path, key)
    missing = [name for name in names if name not in stored]
    if not missing:
        return False
    upgraded = upgrade({name: torch.empty(shape, device="meta") for name, shape in stored.items()})
    return all(name in upgraded for name in missing)


def refuse_resume_if_renamed(path: Path, names: list[str], upgrade: Upgrade) -> None:
    """CheckpointError when the checkpoint at `path` holds the model parameters `names` under an
    earlier version's names: its weights load (mapped), its optimizer state does not."""
    if renamed_since(path, "model", names, upgrade):
        raise CheckpointError(f"{path} holds the parameters under the names of an earlier version (e.g. attn_q, "
                              "attn_k, attn_v, now one attn_qkv), so its optimizer state cannot be resumed; its "
                              f"weights load as they are: start a new run from them with model.init_from={path}")


def load_weights(path: Path, key: str, shapes: dict[str, tuple[int, ...]], upgrade: Upgrade) -> dict[str, torch.Tensor]:
    """Full float32 CPU tensors of the parameters `shapes` names, read from `key` of the (checked)
    DCP checkpoint at `path` by this process alone. A checkpoint written with an earlier
    version's names is read under those and mapped onto today's by `upgrade`."""
    legacy = renamed_since(path, key, list(shapes), upgrade)
    read = stored_shapes(path, key) if legacy else shapes
    weights = {name: torch.empty(shape) for name, shape in read.items()}
    dcp_load({key: weights}, path, no_dist=True)
    return upgrade(weights) if legacy else weights


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
    upgrade = _upgrade(cfg)
    if renamed_since(path, key, list(weights), upgrade):  # saved by an earlier version: names mapped
        shapes = {name: tuple(p.shape) for name, p in weights.items()}
        with torch.no_grad():
            model.load_state_dict(load_weights(path, key, shapes, upgrade), strict=True)
    else:
        dcp_load({key: weights}, path, no_dist=True)
    return model.to(device).eval(), cfg, load_tokenizer(path / "tokenizer")


def _upgrade(cfg) -> Upgrade:
    from pretrain.models import get_family

    family = get_family(cfg.model.family)
    return lambda state: family.upgrade_state(state, cfg.model)


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
        shadow = load_weights(path, "ema", {name: tuple(t.shape) for name, t in tensors.items()}, _upgrade(cfg))
        tensors.update({f"ema.{name}": shadow[name].to(tensors[name].dtype) for name in tensors})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"config": json.dumps(meta["config"]), "step": str(meta["step"]),
                                              "vocab_size": str(cfg.model.vocab_size)})
    return out
