"""Is a checkpoint whole? Digests written at save time, checks made before every load.

At save time every rank hashes (SHA-256) the shard files it wrote, and rank 0 the rest
(`.metadata`, meta.json, attachments), into `manifest.json`, before the folder gets its final
name. Before a load, `checkpoint_problem` checks, cheapest first: meta.json and `.metadata` exist
and parse, every file has its recorded size, (mode "digest") every file its recorded digest, and
every byte range `.metadata` points to lies inside a file of the checkpoint. `.metadata` is read
by the allow-listed unpickler (safe.py), so a crafted one is refused, never run.

Checkpoints written before digests existed (no manifest.json) still load: they get the size and
metadata checks only, with a warning once. SHA-256: 1.8 GB/s a core on CPUs with SHA extensions
(most x86 and ARM server CPUs since 2017), and `sha256sum` checks a file by hand.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import Literal

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata

from pretrain.checkpoint.folder import DCP_METADATA, MANIFEST, META, is_deepspeed_checkpoint, previous_checkpoint
from pretrain.checkpoint.safe import read_dcp_metadata
from pretrain.errors import CheckpointError
from pretrain.files import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

VerifyMode = Literal["digest", "size"]
ALGORITHM = "sha256"
META_KEY = "manifest"  # meta.json names its manifest, so a deleted manifest is not taken for an old checkpoint
_legacy_warned: set[Path] = set()


class _Damaged(Exception):
    """Why a checkpoint fails its checks (the message)."""


def _entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "digest": file_sha256(path)}


def digest_share(metadata: Metadata, folder: Path, rank: int) -> dict[str, dict]:
    """Size and digest of the shard files this rank wrote (DCP's file system writer names them
    `__<rank>_<n>.distcp`): each rank hashes what is in its own page cache. A file no rank claims
    is hashed by rank 0 in write_manifest, so a change of DCP's naming costs time, never a digest."""
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    return {name: _entry(folder / name) for name in files if name.startswith(f"__{rank}_")}


def write_manifest(folder: Path, entries: dict[str, dict]) -> None:
    """manifest.json for every file in `folder`: `entries` (the ranks' shares) plus the files they
    did not cover, hashed here. Written last, after meta.json, so it covers that too."""
    entries = dict(entries)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST and name not in entries:
            entries[name] = _entry(path)
    atomic_write_text(folder / MANIFEST, json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))},
                                                   indent=1))


def checkpoint_problem(path: Path, mode: VerifyMode = "digest", rank: int = 0, world_size: int = 1) -> str | None:
    """Why the checkpoint at `path` must not be loaded, or None if it passes. With several ranks,
    each passes its rank: the digests are split between them, the cheap checks made by all."""
    try:
        manifest = _manifest(path)
        if manifest is None:
            if rank == 0 and path not in _legacy_warned:
                _legacy_warned.add(path)
                log.warning("%s has no digests (saved before checkpoints recorded them): only sizes and the DCP "
                            "metadata are checked; resume from it and save to add them", path)
        else:
            _check_sizes(path, manifest)
            if mode == "digest":
                _check_digests(path, manifest, rank, world_size)
        _check_extents(path, manifest)
    except _Damaged as err:
        return str(err)
    return None


def agreed_problem(path: Path, mode: VerifyMode) -> str | None:
    """checkpoint_problem over every rank of the job (collective), the digests split between the
    ranks: the same answer everywhere, so all ranks load the same checkpoint."""
    if not dist.is_initialized():
        return checkpoint_problem(path, mode)
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, checkpoint_problem(path, mode, dist.get_rank(), dist.get_world_size()))
    return next((p for p in problems if p), None)


def require_verified(path: Path, mode: VerifyMode, collective: bool) -> None:
    """Raise a one-line CheckpointError if the checkpoint fails its checks (collective: split over
    the job's ranks, for a load every rank makes; otherwise this process checks it all)."""
    problem = agreed_problem(path, mode) if collective else checkpoint_problem(path, mode)
    if problem is not None:
        previous = previous_checkpoint(path)
        instead = f"pass an earlier one, e.g. {previous}" if previous else "pass another checkpoint"
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {problem}; {instead}")


def _manifest(path: Path) -> dict | None:
    """The manifest's files (name -> size and digest), None for a checkpoint older than digests."""
    if not path.is_dir():
        raise _Damaged("it is not a folder")
    meta = _read_json(path / META)
    if not (path / DCP_METADATA).is_file() and not is_deepspeed_checkpoint(path):
        raise _Damaged(f"{DCP_METADATA} is missing")
    if META_KEY not in meta and not (path / MANIFEST).exists():
        return None
    manifest = _read_json(path / MANIFEST)
    files = manifest.get("files")
    if manifest.get("algorithm") != ALGORITHM or not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("digest"), str)
            for e in files.values()):
        raise _Damaged(f"{MANIFEST} is malformed")
    return files


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise _Damaged(f"{file.name} is missing")
    try:
        value = json.loads(file.read_bytes())
    except (OSError, ValueError) as err:
        raise _Damaged(f"{file.name} is unreadable ({err})") from None
    if not isinstance(value, dict):
        raise _Damaged(f"{file.name} does not hold a JSON object")
    return value


def _check_sizes(path: Path, files: dict) -> None:
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise _Damaged(f"{name} is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise _Damaged(f"{name} has {size:,} bytes, {entry['size']:,} when saved (truncated or overwritten)")


def _check_digests(path: Path, files: dict, rank: int, world_size: int) -> None:
    for name in sorted(files)[rank::world_size]:
        if file_sha256(path / name) != files[name]["digest"]:
            raise _Damaged(f"{name} does not match its {ALGORITHM} digest (bytes changed since the save)")


def _check_extents(path: Path, files: dict | None) -> None:
    """Every byte range `.metadata` points to lies in a file of this checkpoint (the manifest's,
    when there is one): catches truncated shards of old checkpoints, and paths out of the folder.
    A DeepSpeed engine's checkpoint has no such index: its sizes and digests are all there is."""
    if is_deepspeed_checkpoint(path):
        if files is None:
            raise _Damaged(f"{MANIFEST} is missing")
        return
    try:
        metadata = read_dcp_metadata(path / DCP_METADATA)
    except CheckpointError as err:
        raise _Damaged(str(err)) from None
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise _Damaged(f"{DCP_METADATA} points outside the checkpoint ({name!r})")
        ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(ends.items()):
        file = path / name
        if files is not None and name not in files:
            raise _Damaged(f"{DCP_METADATA} points to {name}, which the manifest does not list")
        if not file.is_file():
            raise _Damaged(f"{name} is missing")
        if file.stat().st_size < end:
            raise _Damaged(f"{name} has {file.stat().st_size:,} bytes but {DCP_METADATA} reads up to byte {end:,} "
                           "(truncated)")
