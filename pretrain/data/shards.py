"""Opening a split of a shard folder (every shard there, whole, of the expected tokenizer) and
reading samples from it; unreadable data is delivered in place as valid=False, and counted.

What is damaged, and when it is found: a missing or wrong-size shard when the split is opened; a
shard whose bytes differ from the manifest's sha256 when a process first reads it (each reading
process hashes each shard it touches once, a sequential read that warms the page cache for the
reads that follow); a sample whose tar header fails its checks, or that holds a token id outside
the vocabulary, as it is read.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.data.order import Piece
from pretrain.files import file_sha256
from tokenizer.format import Manifest, ShardError, ShardInfo, ShardReader, read_manifest
from tokenizer.tokenizers import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

REPAIR_HINT = ("re-create the shards with `proseco tokenizer shard` or find the damaged files with "
               "`proseco tokenizer verify {folder}`")
SCAN_CHUNK = 1024
"""Samples per read when a damaged shard is scanned whole (bounds the memory of the scan)."""


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split of an opened folder, with the ones found unusable at opening."""

    folder: Path
    split: str
    seq_len: int
    dtype: str
    vocab_size: int
    """Token ids at or above it are damage (they would index past the embedding)."""
    infos: tuple[ShardInfo, ...]
    paths: tuple[Path, ...]
    counts: tuple[int, ...]
    bad: frozenset[int]
    """Indices (into `infos`) of missing or wrong-size shards: their samples read as invalid."""

    @property
    def samples(self) -> int:
        return sum(self.counts)


def open_split(folder: str | Path, split: str = "train", *, expected_tokenizer_sha256: str | None = None,
               max_corrupt_fraction: float = 0.01) -> tuple[Manifest, SplitShards]:
    """Read the manifest of `folder` and check that every shard of `split` is there, whole.

    Raises `ShardError` for a missing folder or manifest, an unknown or empty split, a tokenizer
    other than the expected one, or more than `max_corrupt_fraction` of the split's shards missing
    or of the wrong size. Fewer bad shards are logged and returned in `SplitShards.bad`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist; build it with `proseco tokenizer shard "
                         "--corpus NAME --tokenizer DIR --seq-len L --out DIR` or fix data.shards")
    manifest = read_manifest(folder)
    if expected_tokenizer_sha256 is not None and manifest.tokenizer_sha256 != expected_tokenizer_sha256:
        raise ShardError(f"{folder} was tokenized with tokenizer sha256 {manifest.tokenizer_sha256}, but this run "
                         f"uses tokenizer sha256 {expected_tokenizer_sha256}; re-shard the corpus with the run's "
                         "tokenizer (`proseco tokenizer shard`) or point data.shards at shards made with it")
    if manifest.fingerprint and manifest.fingerprint != manifest.compute_fingerprint():
        logger.warning("%s: the manifest's fingerprint %s does not match its content (%s); was it edited by hand?",
                       folder, manifest.fingerprint, manifest.compute_fingerprint())
    if split not in manifest.splits:
        known = ", ".join(sorted(manifest.splits)) or "none"
        raise ShardError(f"{folder} has no split {split!r} (it has: {known}); re-shard with that split "
                         "or choose one of those")
    info = manifest.splits[split]
    counts = tuple(int(s.samples) for s in info.shards)
    if not info.shards or sum(counts) == 0:
        raise ShardError(f"split {split!r} of {folder} is empty; re-shard with more data for it")
    if sum(counts) != info.samples:
        raise ShardError(f"{folder}/manifest.json is inconsistent: split {split!r} claims {info.samples} samples "
                         f"but its shards hold {sum(counts)}; re-create the shards")
    paths = tuple(folder / s.path for s in info.shards)
    bad = _check_files(folder, split, info.shards, paths, max_corrupt_fraction)
    shards = SplitShards(folder=folder, split=split, seq_len=manifest.seq_len, dtype=manifest.dtype,
                         vocab_size=manifest.vocab_size, infos=tuple(info.shards), paths=paths, counts=counts,
                         bad=bad)
    return manifest, shards


def open_shards(folder: str | Path) -> tuple[Manifest, Tokenizer]:
    """The manifest of a shard folder and the tokenizer copied into it, checked against each other."""
    folder = Path(folder)
    manifest = read_manifest(folder) if folder.is_dir() else open_split(folder)[0]  # open_split names the fix
    tokenizer = load_tokenizer(folder / "tokenizer")
    if tokenizer.sha256 != manifest.tokenizer_sha256 or tokenizer.vocab_size != manifest.vocab_size:
        raise ShardError(f"{folder}/tokenizer (sha256 {tokenizer.sha256}, vocab {tokenizer.vocab_size}) is not the "
                         f"tokenizer the shards were made with (sha256 {manifest.tokenizer_sha256}, vocab "
                         f"{manifest.vocab_size}); re-create the shards with `proseco tokenizer shard`")
    return manifest, tokenizer


def _check_files(folder: Path, split: str, infos: Sequence[ShardInfo], paths: Sequence[Path],
                 max_corrupt_fraction: float) -> frozenset[int]:
    """Indices of shards that are missing or whose size differs from the manifest's."""
    bad: dict[int, str] = {}
    for index, (info, path) in enumerate(zip(infos, paths)):
        try:
            size = os.stat(path).st_size
        except OSError as err:
            bad[index] = f"{path}: cannot be read ({err.strerror})"
            continue
        if size != info.bytes:
            bad[index] = f"{path}: {size} bytes, the manifest says {info.bytes} (truncated or overwritten)"
    for problem in bad.values():
        logger.warning("%s; its %s samples will be delivered as valid=False", problem, split)
    if len(bad) > max_corrupt_fraction * len(infos):
        listed = "; ".join(list(bad.values())[:5]) + ("; ..." if len(bad) > 5 else "")
        raise ShardError(f"{len(bad)} of {len(infos)} {split} shards of {folder} are unusable (more than "
                         f"max_corrupt_fraction={max_corrupt_fraction}): {listed}; "
                         + REPAIR_HINT.format(folder=folder))
    return frozenset(bad)


@functools.cache
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def _sha256_of(path: Path) -> str:
    """A shard's sha256, computed once per process while the file stays the same (size and
    modification time): every validation pass opens the split anew."""
    stat = os.stat(path)
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


class SampleReader:
    """Reads pieces of shards in one process; keeps one `ShardReader` per shard it touched.

    A shard is hashed before its first read (unless `verify_digests` is off): one whose digest
    differs from the manifest's is delivered whole as zeroed, flagged samples (past
    max_corrupt_fraction of the split's shards, a ShardError): its bytes cannot be trusted, the
    samples that still parse included. A sample whose tar header fails its checks, or with a token id outside the
    vocabulary, is returned zeroed and flagged; the first time a shard shows one, the whole shard
    is scanned once: this process then knows the shard's exact damage, and fails (or warns) the
    same way whichever of its samples were read first.
    """

    def __init__(self, shards: SplitShards, max_corrupt_fraction: float, verify_digests: bool = True):
        self.shards = shards
        self.max_corrupt_fraction, self.verify_digests = max_corrupt_fraction, verify_digests
        self._readers: dict[int, ShardReader] = {}
        self._scanned: set[int] = set()
        self._altered: set[int] = set()  # shards whose bytes are not the manifest's

    def read(self, pieces: Sequence[Piece], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens int64 [n, seq_len] of the pieces in order, and a bool [n]: True where unreadable."""
        if len(pieces) == 1 and pieces[0].shard not in self.shards.bad:
            return self._read_piece(pieces[0])
        tokens = np.zeros((n, self.shards.seq_len), dtype=np.int64)
        corrupt = np.ones(n, dtype=bool)
        row = 0
        for piece in pieces:
            size = piece.stop - piece.start
            if piece.shard not in self.shards.bad:  # a bad shard's rows stay zero and corrupt
                tokens[row: row + size], corrupt[row: row + size] = self._read_piece(piece)
            row += size
        return tokens, corrupt

    def _read_piece(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        path = self.shards.paths[piece.shard]
        try:
            reader = self._reader(piece.shard)
            if piece.shard in self._altered:
                size = piece.stop - piece.start
                return np.zeros((size, self.shards.seq_len), dtype=np.int64), np.ones(size, dtype=bool)
            tokens, ok = reader.read(piece.start, piece.stop)
        except OSError as err:
            raise ShardError(f"{path} became unreadable during training ({err}); "
                             + REPAIR_HINT.format(folder=self.shards.folder)) from None
        corrupt = self._damaged(tokens, ok)
        if corrupt.any():
            tokens[corrupt] = 0  # garbage ids could exceed the vocabulary; zeros are inert
            self._scan(piece.shard)
        return tokens, corrupt

    def _damaged(self, tokens: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Samples whose header failed, or that hold an id outside the vocabulary."""
        return ~ok | (tokens >= self.shards.vocab_size).any(axis=1)

    def _reader(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            self._readers[shard] = ShardReader(self.shards.paths[shard], self.shards.infos[shard],
                                               self.shards.seq_len, self.shards.dtype)
            if self.verify_digests:
                self._verify(shard)
        return self._readers[shard]

    def _verify(self, shard: int) -> None:
        """Compare a shard's bytes with the manifest's sha256 (once per shard and process)."""
        path, expected = self.shards.paths[shard], self.shards.infos[shard].sha256
        actual = _sha256_of(path)
        if actual == expected:
            return
        self._altered.add(shard)
        logger.warning("%s: sha256 %s..., the manifest says %s... (altered bytes); its %d samples are delivered "
                       "as valid=False", path, actual[:12], expected[:12], self.shards.counts[shard])
        total = len(self.shards.paths)
        if len(self._altered) + len(self.shards.bad) > self.max_corrupt_fraction * total:
            raise ShardError(f"{path}: its sha256 differs from the manifest's; {len(self._altered)} altered and "
                             f"{len(self.shards.bad)} unusable of {total} {self.shards.split} shards are more than "
                             f"max_corrupt_fraction={self.max_corrupt_fraction}; "
                             + REPAIR_HINT.format(folder=self.shards.folder))

    def _scan(self, shard: int) -> None:
        """Count a damaged shard's unreadable samples once; raise past the allowed fraction."""
        if shard in self._scanned:
            return
        self._scanned.add(shard)
        reader, count, path = self._reader(shard), self.shards.counts[shard], self.shards.paths[shard]
        damaged = 0
        for start in range(0, count, SCAN_CHUNK):
            tokens, ok = reader.read(start, min(count, start + SCAN_CHUNK))
            damaged += int(self._damaged(tokens, ok).sum())
        if damaged > self.max_corrupt_fraction * count:
            raise ShardError(f"{path}: {damaged} of {count} samples are unreadable or hold ids outside the "
                             f"vocabulary of {self.shards.vocab_size} (more than "
                             f"max_corrupt_fraction={self.max_corrupt_fraction}); "
                             + REPAIR_HINT.format(folder=self.shards.folder))
        logger.warning("%s: %d of %d samples are unreadable; they are delivered as valid=False", path, damaged, count)
