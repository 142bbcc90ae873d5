"""Saving checkpoints atomically, rotating them, and choosing the one to resume from."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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

from pretrain.checkpoint.folder import (
    ASIDE,
    DAMAGED,
    MANIFEST,
    META,
    TMP,
    checkpoint_name,
    checkpoint_step,
    list_checkpoints,
    read_meta,
    step_folders,
)
from pretrain.checkpoint.integrity import (
    META_KEY,
    VerifyMode,
    agreed_problem,
    checkpoint_problem,
    digest_share,
    require_verified,
    write_manifest,
)
from pretrain.checkpoint.safe import dcp_load, dcp_quietly
from pretrain.errors import CheckpointError
from pretrain.files import atomic_write_text

log = logging.getLogger(__name__)

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_main(value):
    """Rank 0's `value` on every rank (collective), e.g. its listing of a shared folder."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    """Put a loaded `app_state` back into the model parts and their optimizers."""
    for part, optimizer in zip(parts, optimizers):
        names = set(get_model_state_dict(part))
        set_model_state_dict(part, {k: v for k, v in state["model"].items() if k in names})
        set_optimizer_state_dict(part, optimizer, state["optim"], options=_FLAT)


def _digests_once_written(written: Future, folder: Path, rank: int) -> dict[str, dict]:
    return digest_share(written.result(), folder, rank)


class Checkpointer:
    """Saves and finds checkpoints in one run's `checkpoints/` folder."""

    def __init__(self, folder: str | Path, keep_last: int = 3, async_save: bool = False, keep_every: int = 0):
        self.folder = Path(folder)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_save = async_save
        self._pending: tuple[Future, Path, dict] | None = None
        # Background saves talk over their own group, so they never interleave with training
        # collectives on the default one; their digests are computed off the training thread too.
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-digests") if async_save else None

    def remove_incomplete(self) -> None:
        """At start-up (rank 0): delete `.tmp` leftovers of saves that never finished, and settle a
        re-save that stopped half-way: the new checkpoint kept if it is in place, else the old one back."""
        if _rank() == 0 and self.folder.is_dir():
            for path in sorted(self.folder.iterdir()):
                if not path.is_dir():
                    continue
                if path.name.endswith(TMP):
                    log.warning("removing incomplete checkpoint %s", path)
                    shutil.rmtree(path, ignore_errors=True)
                elif path.name.endswith(ASIDE):
                    final = path.with_name(path.name[: -len(ASIDE)])
                    if final.exists():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        log.warning("restoring %s: its re-save did not finish", final)
                        os.replace(path, final)
        _barrier()

    def save(self, step: int, state: dict, meta: dict, attachments: dict[str, Path] | None = None) -> Path:
        """Write a checkpoint (collective: every rank calls it). Returns its final path.

        `attachments` are folders copied into the checkpoint (e.g. the tokenizer), so a checkpoint
        folder alone is enough to sample from or convert.
        """
        final, tmp, meta = self._begin(step, meta, attachments)
        no_dist, rank = not dist.is_initialized(), _rank()
        if self.async_save:
            # Tensors are staged to memory before the future is returned; training may then
            # change them. The rename happens once every rank has written and hashed (wait()/poll()).
            with dcp_quietly():
                written = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group, no_dist=no_dist)
            hashed = self._hasher.submit(_digests_once_written, written, tmp, rank)
            self._pending = (hashed, final, meta)
            return final
        with dcp_quietly():
            metadata = dcp.save(state, checkpoint_id=str(tmp), no_dist=no_dist)
        self._finalize(final, meta, digest_share(metadata, tmp, rank))
        return final

    def save_with(self, step: int, write: Callable[[Path], None], meta: dict,
                  attachments: dict[str, Path] | None = None) -> Path:
        """`save` for state another library writes (the DeepSpeed engine's): `write(folder)` is called
        on every rank to fill the temporary folder; then the same manifest, atomic rename and rotation."""
        final, tmp, meta = self._begin(step, meta, attachments)
        write(tmp)
        _barrier()
        self._finalize(final, meta, {})  # rank 0 hashes every file the writer left
        return final

    def _begin(self, step: int, meta: dict, attachments: dict[str, Path] | None) -> tuple[Path, Path, dict]:
        """A fresh temporary folder for step `step` with the attachments in it (all ranks wait for it)."""
        self.wait()
        final = self.folder / checkpoint_name(step)
        tmp = final.with_name(final.name + TMP)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, source in (attachments or {}).items():
                shutil.copytree(source, tmp / name)
        _barrier()
        return final, tmp, {**meta, "step": step, "saved_at": time.time(), META_KEY: MANIFEST}

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
        hashed, final, meta = self._pending
        self._pending = None
        self._finalize(final, meta, hashed.result())

    def _finalize(self, final: Path, meta: dict, digests: dict[str, dict]) -> None:
        """Rank 0 gathers the digests, writes meta.json and the manifest, renames the folder into
        place and rotates; the gather is also the point where every rank has finished writing."""
        entries = self._gather_on_main(digests)
        if _rank() == 0:
            tmp = final.with_name(final.name + TMP)
            atomic_write_text(tmp / META, json.dumps(meta, indent=2))
            write_manifest(tmp, entries)
            _move_into_place(tmp, final)
            self._rotate(final)
        _barrier()

    @staticmethod
    def _gather_on_main(digests: dict[str, dict]) -> dict[str, dict]:
        if not dist.is_initialized():
            return digests
        shares = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(digests, shares, dst=0)
        return {name: entry for share in shares or [] for name, entry in share.items()}

    def _rotate(self, newest: Path) -> None:
        """Keep `keep_last` checkpoints up to the new one (and the keep_every ones). Only once the
        new one passes the cheap checks (sizes, extents), so the last good checkpoint is never
        deleted for a bad one; newer leftovers (skipped on a resume) are replaced when their step
        is saved again."""
        problem = checkpoint_problem(newest, "size")
        if problem is not None:
            log.warning("checkpoint %s is damaged right after saving (%s); keeping every older checkpoint",
                        newest, problem)
            return
        older = [p for p in list_checkpoints(self.folder) if p.name < newest.name]
        for old in older[: max(len(older) - (self.keep_last - 1), 0)]:
            if not self._permanent(old):
                shutil.rmtree(old, ignore_errors=True)

    def _permanent(self, path: Path) -> bool:
        return self.keep_every > 0 and checkpoint_step(path) % self.keep_every == 0

    def resume_point(self, resume: str, verify: VerifyMode) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The checkpoint to resume from (collective: the same on every rank) and the newer ones
        skipped, each with why. resume="auto": the newest in the folder that passes its checks, None
        if the folder holds none at all; a path: that checkpoint, which must pass (no fallback)."""
        if resume != "auto":
            require_verified(Path(resume), verify, collective=True)
            return Path(resume), []
        skipped = []
        for path in reversed(_from_main(step_folders(self.folder))):
            problem = agreed_problem(path, verify)
            if problem is None:
                return path, self._set_aside(skipped)
            skipped.append((path, problem))
        if skipped:
            found = "; ".join(f"{path.name}: {problem}" for path, problem in skipped)
            raise CheckpointError(f"no checkpoint in {self.folder} passes its checks ({found}); restore one, or "
                                  "start over in a new logging.run_dir")
        return None, []

    @staticmethod
    def _set_aside(skipped: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
        """Rename skipped checkpoints to `.damaged` (rank 0), kept for a look but out of the way: no
        later resume checks them again, and the run folder's newest checkpoint is a good one."""
        moved = []
        if _rank() == 0:
            for path, problem in skipped:
                aside = _free_name(path, DAMAGED)
                os.replace(path, aside)
                moved.append((path, f"{problem} (moved to {aside.name})"))
        return _from_main(moved)

    @staticmethod
    def load(path: Path, state: dict, verify: VerifyMode | None = "digest") -> dict:
        """Load tensors in place into `state` (any layout) and return the checkpoint's meta.json.
        Checks the checkpoint first (collective), unless `verify` is None: already checked."""
        if verify is not None:
            require_verified(path, verify, collective=True)
        meta = read_meta(path)
        if not meta.get("has_ema", False):
            state.pop("ema", None)  # saved without EMA: the EMA restarts from the loaded weights
        dcp_load(state, path, no_dist=not dist.is_initialized())
        return meta


def _free_name(path: Path, suffix: str) -> Path:
    """`path` + `suffix`, or with .2, .3, ... after it when that is taken."""
    names = (path.with_name(path.name + suffix + (f".{n}" if n > 1 else "")) for n in itertools.count(1))
    return next(name for name in names if not name.exists())


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. A checkpoint already at `final` (a step saved again, e.g. after a
    resume) is moved aside first and removed only once the new one is in place: a crash in between
    leaves `.old`, which remove_incomplete puts back."""
    aside = final.with_name(final.name + ASIDE)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
