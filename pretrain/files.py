"""Atomic file writes and file digests: a reader of `path` sees the old file or the whole new one, never a part.

The new content is written to a temporary sibling (same folder, so the rename stays on one file
system) and renamed over `path` with `os.replace`, which is atomic on POSIX. The temporary name is
unique per call, so concurrent writers of the same path never write into each other's file; the
last rename wins. No fsync: this guards against crashes and kills of the writer, not power loss.

A leaf module (standard library only), so the tokenizer package may use it too.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_MARK = ".tmp-"
"""In the name of a file being written by `atomic_path` (left behind only by a killed process)."""


def remove_partials(folder: str | os.PathLike, prefix: str) -> int:
    """Delete what killed writers left in `folder`: files named `prefix`*, marked as partial.
    Only for names no live process is writing (e.g. a sharding task's own chunks); returns the count."""
    removed = 0
    for path in Path(folder).glob(f"{prefix}*{PARTIAL_MARK}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write to: renamed over `path` when the block succeeds,
    removed when it raises. The caller writes it (any way: open, gzip, a library's save)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the block failed (or never wrote it)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path` as a Path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path` as a Path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


_HASH_CHUNK = 8 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in large chunks into one buffer (hashlib releases
    the GIL on them, so hashing in a background thread does not stall the training thread). What
    shard manifests and checkpoint manifests record per file."""
    digest, buffer = hashlib.sha256(), bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        while size := stream.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()
