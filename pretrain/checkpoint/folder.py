"""Where checkpoints live: the names of a run's `checkpoints/` folder and the checkpoint's meta.json.

    step_XXXXXXXX/       a finished checkpoint (final name: it was renamed into place)
    step_XXXXXXXX.tmp/   a save in progress, or one that never finished (removed at start-up)
    step_XXXXXXXX.old/   a checkpoint being replaced by a re-save of its step (see Checkpointer)
    step_XXXXXXXX.damaged/  one a resume skipped because it failed its checks (kept for a look)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pretrain.errors import CheckpointError

META = "meta.json"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
DEEPSPEED_DIR = "deepspeed"
"""A DeepSpeed engine's checkpoint keeps DeepSpeed's own files in this subfolder (its "tag") in
place of DCP's shards; meta.json and manifest.json are the same as in a DCP checkpoint."""
TMP, ASIDE, DAMAGED = ".tmp", ".old", ".damaged"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    """The folder name of step `step`'s checkpoint."""
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder holds, from its name."""
    return int(_NAME.match(path.name).group(1))


def is_checkpoint_name(path: Path) -> bool:
    """A final checkpoint name (not a `.tmp` or `.old` one)."""
    return bool(_NAME.match(path.name))


def is_deepspeed_checkpoint(path: Path) -> bool:
    """Saved by the DeepSpeed engine (DeepSpeed's files in DEEPSPEED_DIR, no DCP metadata)."""
    return (path / DEEPSPEED_DIR).is_dir() and not (path / DCP_METADATA).exists()


def is_complete(path: Path) -> bool:
    """A finished checkpoint: final name, DCP metadata (or DeepSpeed's folder) and meta.json all
    present (not yet verified)."""
    tensors = (path / DCP_METADATA).is_file() or is_deepspeed_checkpoint(path)
    return is_checkpoint_name(path) and tensors and (path / META).is_file()


def step_folders(folder: Path) -> list[Path]:
    """Every folder with a final checkpoint name in `folder`, complete or not, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and is_checkpoint_name(p)), key=lambda p: p.name)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    return [p for p in step_folders(folder) if is_complete(p)]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder` (not verified: see checkpoint_problem)."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def previous_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint older than `path` in its folder: what to suggest instead."""
    older = [p for p in list_checkpoints(path.parent) if p.name < path.name]
    return older[-1] if older else None


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json (step, data position, config, ...)."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a complete checkpoint ({err}); pass another checkpoint or "
                              "checkpoint.resume=none") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META} does not hold a JSON object; pass another checkpoint")
    return meta
