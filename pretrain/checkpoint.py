"""Distributed checkpoints (DCP): atomic, rotating, optionally asynchronous, reshardable.

A checkpoint is a folder `step_XXXXXXXX/` holding DCP shards (model, optimizer, EMA, each keyed
by parameter name, so they load into any other dp/tp/pp layout) and `meta.json` (step, data
position, tokens seen, the resolved config, the layout it was saved from). It is written as
`step_XXXXXXXX.tmp/` and renamed only once every rank has finished and meta.json is in place:
a crash, a kill or a full disk mid-save leaves a `.tmp` folder that is never taken as the latest
and is removed at the next start. The RNG needs no saved state: every random draw is keyed by
(seed, step, sample position) or reseeded every step (parallel/rng.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pretrain.errors import CheckpointError
from pretrain.files import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})$")
META = "meta.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    """A finished checkpoint: final name, DCP metadata and meta.json all present."""
    return bool(_NAME.match(path.name)) and (path / ".metadata").is_file() and (path / META).is_file()


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: p.name)


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns at every single-process save and load that it assumes one process, even when
    told so (no_dist=True); in a one-process run that is the intent, not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def app_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], ema_shadow: dict | None) -> dict:
    """The tensors DCP saves and loads in place, keyed by parameter name (optimizer state
    flattened to "state.<name>.<key>"): the same keys on every layout, so any layout loads any
    checkpoint, and the parts of a pipeline rank simply add up."""
    model, optim = {}, {}
    for part, optimizer in zip(parts, optimizers):
        model.update(get_model_state_dict(part))
        optim.update(get_optimizer_state_dict(part, optimizer, options=_FLAT))
    state = {"model": model, "optim": optim}
    if ema_shadow is not None:
        state["ema"] = ema_shadow
    return state


def load_app_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], state: dict) -> None:
    for part, optimizer in zip(parts, optimizers):
        names = set(get_model_state_dict(part))
        set_model_state_dict(part, {k: v for k, v in state["model"].items() if k in names})
        set_optimizer_state_dict(part, optimizer, state["optim"], options=_FLAT)


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a complete checkpoint ({err}); pass another checkpoint or "
                              "checkpoint.resume=none") from None


class Checkpointer:
    """Saves and finds checkpoints in one run's `checkpoints/` folder."""

    def __init__(self, folder: str | Path, keep_last: int = 3, async_save: bool = False, keep_every: int = 0):
        self.folder = Path(folder)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_save = async_save
        self._pending: tuple[Future, Path, dict] | None = None
        # Background saves talk over their own group, so they never interleave with training
        # collectives on the default one.
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def remove_incomplete(self) -> None:
        """Delete `.tmp` leftovers of saves that never finished (rank 0, at start-up)."""
        if _rank() == 0 and self.folder.is_dir():
            for path in self.folder.iterdir():
                if path.is_dir() and path.name.endswith(".tmp"):
                    log.warning("removing incomplete checkpoint %s", path)
                    shutil.rmtree(path, ignore_errors=True)
        _barrier()

    def save(self, step: int, state: dict, meta: dict, attachments: dict[str, Path] | None = None) -> Path:
        """Write a checkpoint (collective: every rank calls it). Returns its final path.

        `attachments` are folders copied into the checkpoint (e.g. the tokenizer), so a checkpoint
        folder alone is enough to sample from or convert.
        """
        self.wait()
        final = self.folder / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, source in (attachments or {}).items():
                shutil.copytree(source, tmp / name)
        _barrier()
        meta = {**meta, "step": step, "saved_at": time.time()}
        if self.async_save:
            # Tensors are staged to memory before the future is returned; training may then
            # change them. The rename happens once every rank has written (wait()/poll()).
            with _single_process_quietly():
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group,
                                        no_dist=not dist.is_initialized())
            self._pending = (future, final, meta)
            return final
        with _single_process_quietly():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        self._finalize(final, meta)
        return final

    def poll(self) -> None:
        """Finish an asynchronous save once every rank's writes are done (call every step)."""
        if self._pending is None:
            return
        done = torch.tensor([int(self._pending[0].done())])
        if dist.is_initialized():  # all ranks must agree, or only some would enter the barrier
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._group)
        if done.item():
            self.wait()

    def wait(self) -> None:
        """Block until a pending asynchronous save is complete and renamed."""
        if self._pending is None:
            return
        future, final, meta = self._pending
        self._pending = None
        future.result()
        self._finalize(final, meta)

    def _finalize(self, final: Path, meta: dict) -> None:
        _barrier()
        if _rank() == 0:
            tmp = final.with_name(final.name + ".tmp")
            atomic_write_text(tmp / META, json.dumps(meta, indent=2))
            if final.exists():  # re-saving a step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.folder)[: -self.keep_last]:
                if not self._permanent(old):
                    shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def _permanent(self, path: Path) -> bool:
        return self.keep_every > 0 and int(_NAME.match(path.name).group(1)) % self.keep_every == 0

    @staticmethod
    def load(path: Path, state: dict) -> dict:
        """Load tensors in place into `state` (any layout) and return the checkpoint's meta.json."""
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete checkpoint (no .metadata or meta.json: an "
                                  "interrupted save?); pass a complete one or checkpoint.resume=auto")
        meta = read_meta(path)
        if not meta.get("has_ema", False):
            state.pop("ema", None)  # saved without EMA: the EMA restarts from the loaded weights
        with _single_process_quietly():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        return meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder (then its latest checkpoint)."""
    path = Path(path)
    if is_complete(path):
        return path
    for folder in (path / "checkpoints", path):
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint at {path}; pass a step_XXXXXXXX folder or a run folder "
                          "that holds checkpoints/")


def load_model(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """A trained model for inference (EMA weights by default), its run config and its tokenizer.

    Reads any checkpoint (any layout it was saved from) into one process; the tokenizer travels
    inside the checkpoint folder.
    """
    from pretrain.config import RunConfig, load_config_dict
    from pretrain.models import ModelShape, get_family
    from tokenizer.tokenizers import load_tokenizer

    path = resolve_checkpoint(path)
    meta = read_meta(path)
    cfg: RunConfig = load_config_dict(meta["config"], drop_unknown=True)
    model = get_family(cfg.model.family).build(cfg.model, ModelShape.of(cfg.model))
    weights = dict(model.named_parameters())
    key = "ema" if use_ema and meta.get("has_ema", False) else "model"
    # no_dist: this process reads every shard itself, also inside a multi-process job.
    with _single_process_quietly():
        dcp.load({key: weights}, checkpoint_id=str(path), no_dist=True)
    return model.to(device).eval(), cfg, load_tokenizer(path / "tokenizer")


def consolidate(path: str | Path, out: str | Path) -> Path:
    """One safetensors file with the full weights of a checkpoint saved on any layout: the raw
    weights under their parameter names, the EMA under "ema.<name>", and the run config and step
    in the file's metadata."""
    from safetensors.torch import save_file

    path = resolve_checkpoint(path)
    meta = read_meta(path)
    model, cfg, _ = load_model(path, use_ema=False)
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    if meta.get("has_ema", False):
        shadow = {name: torch.empty_like(p) for name, p in tensors.items()}
        with _single_process_quietly():
            dcp.load({"ema": shadow}, checkpoint_id=str(path), no_dist=True)
        tensors.update({f"ema.{name}": t for name, t in shadow.items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"config": json.dumps(meta["config"]), "step": str(meta["step"]),
                                              "vocab_size": str(cfg.model.vocab_size)})
    return out
