"""Opening a split of a shard folder (every shard there, whole, of the expected tokenizer) and
reading samples from it; unreadable data is delivered in place as valid=False, and counted.

The folder is a local path or a URL (`tokenizer.storage`). What is damaged, and when it is found:
a missing or wrong-size shard when the split is opened (local folders; over a URL, when a process
first touches the shard: one size request per shard and process instead of one per shard and rank
at start-up); a shard whose bytes differ from the manifest's sha256 when a process first reads it
(each reading process hashes each shard it touches once); a member whose tar or npy header fails
its checks, or a sample that holds a token id outside the vocabulary, as it is read. A read that
fails for another reason (a server down, a timeout) is retried and then raises `StorageError`: it
never turns into damage, so it never changes which sample a position holds.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.data.order import Piece
from pretrain.files import file_sha256
from tokenizer.format import Geometry, Manifest, ShardError, ShardInfo, ShardReader, read_manifest
from tokenizer.storage import DEFAULT_POLICY, ReadPolicy, Store
from tokenizer.tokenizers import Tokenizer, load_tokenizer
from tokenizer.transfer import local_tokenizer

logger = logging.getLogger(__name__)

REPAIR_HINT = ("re-create the shards with `proseco tokenizer shard` or find the damaged files with "
               "`proseco tokenizer verify {folder}`")
SCAN_CHUNK = 1024
"""Samples per read when a damaged shard is scanned whole (bounds the memory of the scan)."""
Spans = list[tuple[tuple[int, int], bytes]]
"""What one piece's fetch returns: (byte range, its bytes) pairs (`ShardReader.fetch`)."""


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split of an opened folder, with the ones found unusable at opening."""

    folder: Path | str
    """The folder as given: a Path, or the URL."""
    store: Store
    geometry: Geometry
    split: str
    seq_len: int
    dtype: str
    vocab_size: int
    """Token ids at or above it are damage (they would index past the embedding)."""
    infos: tuple[ShardInfo, ...]
    paths: tuple[Path | str, ...]
    """Where each shard is: a Path in a local folder, a URL otherwise (for messages)."""
    counts: tuple[int, ...]
    bad: frozenset[int]
    """Indices (into `infos`) of shards found missing or of the wrong size at opening (local
    folders): their samples read as invalid."""

    @property
    def samples(self) -> int:
        return sum(self.counts)


def open_split(folder: str | Path, split: str = "train", *, expected_tokenizer_sha256: str | None = None,
               max_corrupt_fraction: float = 0.01, policy: ReadPolicy = DEFAULT_POLICY) -> tuple[Manifest, SplitShards]:
    """Read the manifest of `folder` (a path or URL) and check that every shard of `split` is there, whole.

    Raises `ShardError` for a missing folder or manifest, an unknown or empty split, a tokenizer
    other than the expected one, or more than `max_corrupt_fraction` of the split's shards missing
    or of the wrong size. Fewer bad shards are logged and returned in `SplitShards.bad`.
    """
    store = Store(folder, policy)
    folder = Path(store.root) if store.local else store.root
    if not store.exists():
        raise ShardError(f"shard folder {folder} does not exist; build it with `proseco tokenizer shard "
                         "--corpus NAME --tokenizer DIR --seq-len L --out DIR` or fix data.shards")
    manifest = read_manifest(store)
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
    paths = tuple(store.path(s.path) if store.local else store.url(s.path) for s in info.shards)
    # Over a URL each process checks a shard's size when it first touches it (SampleReader).
    bad = _check_files(folder, split, info.shards, paths, max_corrupt_fraction) if store.local else frozenset()
    shards = SplitShards(folder=folder, store=store, geometry=Geometry.of(manifest), split=split,
                         seq_len=manifest.seq_len, dtype=manifest.dtype, vocab_size=manifest.vocab_size,
                         infos=tuple(info.shards), paths=paths, counts=counts, bad=bad)
    return manifest, shards


def open_shards(folder: str | Path, policy: ReadPolicy = DEFAULT_POLICY) -> tuple[Manifest, Tokenizer]:
    """The manifest of a shard folder (path or URL) and the tokenizer copied into it, checked against
    each other. A URL's tokenizer is downloaded once into a local cache (`tokenizer.transfer`)."""
    store = Store(folder, policy)
    # open_split names the fix for a missing folder
    manifest = read_manifest(store) if store.exists() else open_split(folder, policy=policy)[0]
    tokenizer = load_tokenizer(store.path("tokenizer") if store.local
                               else local_tokenizer(store, manifest.tokenizer_sha256))
    if tokenizer.sha256 != manifest.tokenizer_sha256 or tokenizer.vocab_size != manifest.vocab_size:
        raise ShardError(f"{folder}/tokenizer (sha256 {tokenizer.sha256}, vocab {tokenizer.vocab_size}) is not the "
                         f"tokenizer the shards were made with (sha256 {manifest.tokenizer_sha256}, vocab "
                         f"{manifest.vocab_size}); re-create the shards with `proseco tokenizer shard`")
    return manifest, tokenizer


def _check_files(folder: Path | str, split: str, infos: Sequence[ShardInfo], paths: Sequence[Path],
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
            bad[index] = _size_problem(path, size, info.bytes)
    for problem in bad.values():
        logger.warning("%s; its %s samples will be delivered as valid=False", problem, split)
    if len(bad) > max_corrupt_fraction * len(infos):
        listed = "; ".join(list(bad.values())[:5]) + ("; ..." if len(bad) > 5 else "")
        raise ShardError(f"{len(bad)} of {len(infos)} {split} shards of {folder} are unusable (more than "
                         f"max_corrupt_fraction={max_corrupt_fraction}): {listed}; "
                         + REPAIR_HINT.format(folder=folder))
    return frozenset(bad)


def _size_problem(path: Path | str, size: int, expected: int) -> str:
    return f"{path}: {size} bytes, the manifest says {expected} (truncated or overwritten)"


@functools.cache
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


@functools.cache
def _remote_sha256_cached(store: Store, relative: str, size: int) -> str:
    return store.sha256(relative, size)


def _sha256_of(path: Path) -> str:
    """A shard's sha256, computed once per process while the file stays the same (size and
    modification time): every validation pass opens the split anew."""
    stat = os.stat(path)
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


class SampleReader:
    """Reads pieces of shards in one process; keeps one `ShardReader` per shard it touched.

    A read has two halves: `fetch` does the I/O (thread-safe, so that the loader can fetch the
    next items in threads while this one is parsed) and `assemble` checks and decodes; `read`
    does both. A shard is hashed before its first read (unless `verify_digests` is off): one whose
    digest differs from the manifest's is delivered whole as zeroed, flagged samples (past
    max_corrupt_fraction of the split's shards, a ShardError): its bytes cannot be trusted, the
    samples that still parse included. A member whose headers fail their checks, or a sample with
    a token id outside the vocabulary, is returned zeroed and flagged; the first time a shard shows
    one, the whole shard is scanned once: this process then knows the shard's exact damage, and
    fails (or warns) the same way whichever of its samples were read first.
    """

    def __init__(self, shards: SplitShards, max_corrupt_fraction: float, verify_digests: bool = True):
        self.shards = shards
        self.max_corrupt_fraction, self.verify_digests = max_corrupt_fraction, verify_digests
        self._readers: dict[int, ShardReader] = {}
        self._scanned: set[int] = set()
        self._altered: set[int] = set()  # shards whose bytes are not the manifest's
        self._unusable: set[int] = set()  # remote shards found missing or of the wrong size
        self._lock = threading.Lock()  # guards _shard_locks: fetch threads open shards concurrently
        self._shard_locks: dict[int, threading.Lock] = {}

    def read(self, pieces: Sequence[Piece], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens int64 [n, seq_len] of the pieces in order, and a bool [n]: True where unreadable."""
        return self.assemble(pieces, n, self.fetch(pieces))

    def fetch(self, pieces: Sequence[Piece]) -> list[Spans | None]:
        """The bytes of each piece (None for a shard known to be unusable)."""
        return [self._fetch_piece(piece) for piece in pieces]

    def _fetch_piece(self, piece: Piece) -> Spans | None:
        if piece.shard in self.shards.bad:
            return None
        try:
            reader = self._reader(piece.shard)
            if reader is None:
                return None
            return reader.fetch(piece.start, piece.stop)
        except OSError as err:
            raise ShardError(f"{self.shards.paths[piece.shard]} became unreadable during training ({err}); "
                             + REPAIR_HINT.format(folder=self.shards.folder)) from None

    def assemble(self, pieces: Sequence[Piece], n: int,
                 fetched: list[Spans | None]) -> tuple[np.ndarray, np.ndarray]:
        """`read`'s result from what `fetch(pieces)` returned."""
        tokens = np.zeros((n, self.shards.seq_len), dtype=np.int64)
        corrupt = np.ones(n, dtype=bool)
        row = 0
        for piece, chunks in zip(pieces, fetched):
            size = piece.stop - piece.start
            if chunks is not None:  # an unusable shard's rows stay zero and corrupt
                tokens[row: row + size], corrupt[row: row + size] = self._parse_piece(piece, chunks)
            row += size
        return tokens, corrupt

    def _parse_piece(self, piece: Piece, chunks: Spans) -> tuple[np.ndarray, np.ndarray]:
        tokens, ok = self._readers[piece.shard].parse(piece.start, piece.stop, chunks)
        corrupt = self._damaged(tokens, ok)
        if corrupt.any():
            tokens[corrupt] = 0  # garbage ids could exceed the vocabulary; zeros are inert
            self._scan(piece.shard)
        return tokens, corrupt

    def _damaged(self, tokens: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Samples whose header failed, or that hold an id outside the vocabulary."""
        return ~ok | (tokens >= self.shards.vocab_size).any(axis=1)

    def _reader(self, shard: int) -> ShardReader | None:
        """The shard's reader, opened (size and digest checked) on first use; None when unusable.
        One lock per shard: threads reading an opened shard never wait for another one's digest."""
        with self._lock:
            lock = self._shard_locks.setdefault(shard, threading.Lock())
        with lock:
            if shard not in self._readers:
                reader = ShardReader(self.shards.store, self.shards.infos[shard], self.shards.geometry)
                if not self.shards.store.local:
                    self._check_size(shard)
                if self.verify_digests and shard not in self._unusable:
                    if self._verify(shard):
                        # Bytes equal to the manifest's hold intact headers: no read fetches them again.
                        reader.verified.update(range(reader.blocks))
                self._readers[shard] = reader
            if shard in self._unusable or shard in self._altered:
                return None
            return self._readers[shard]

    def _too_many_bad_shards(self) -> bool:
        unusable = len(self._altered) + len(self._unusable) + len(self.shards.bad)
        return unusable > self.max_corrupt_fraction * len(self.shards.paths)

    def _check_size(self, shard: int) -> None:
        """A remote shard's size against the manifest's (once per shard and process)."""
        info, path = self.shards.infos[shard], self.shards.paths[shard]
        try:
            size = self.shards.store.size(info.path)
        except FileNotFoundError:
            problem = f"{path}: missing"
        else:
            if size == info.bytes:
                return
            problem = _size_problem(path, size, info.bytes)
        self._unusable.add(shard)
        logger.warning("%s; its %d %s samples are delivered as valid=False", problem, self.shards.counts[shard],
                       self.shards.split)
        if self._too_many_bad_shards():
            raise ShardError(f"{problem}; {len(self._unusable) + len(self._altered)} unusable of "
                             f"{len(self.shards.paths)} {self.shards.split} shards are more than "
                             f"max_corrupt_fraction={self.max_corrupt_fraction}; "
                             + REPAIR_HINT.format(folder=self.shards.folder))

    def _verify(self, shard: int) -> bool:
        """Compare a shard's bytes with the manifest's sha256 (once per shard and process); True if equal."""
        path, info = self.shards.paths[shard], self.shards.infos[shard]
        store = self.shards.store
        actual = _sha256_of(Path(path)) if store.local else _remote_sha256_cached(store, info.path, info.bytes)
        if actual == info.sha256:
            return True
        self._altered.add(shard)
        logger.warning("%s: sha256 %s..., the manifest says %s... (altered bytes); its %d samples are delivered "
                       "as valid=False", path, actual[:12], info.sha256[:12], self.shards.counts[shard])
        if self._too_many_bad_shards():
            raise ShardError(f"{path}: its sha256 differs from the manifest's; {len(self._altered)} altered and "
                             f"{len(self.shards.bad) + len(self._unusable)} unusable of {len(self.shards.paths)} "
                             f"{self.shards.split} shards are more than "
                             f"max_corrupt_fraction={self.max_corrupt_fraction}; "
                             + REPAIR_HINT.format(folder=self.shards.folder))
        return False

    def _scan(self, shard: int) -> None:
        """Count a damaged shard's unreadable samples once; raise past the allowed fraction."""
        if shard in self._scanned:
            return
        self._scanned.add(shard)
        reader, count, path = self._readers[shard], self.shards.counts[shard], self.shards.paths[shard]
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
