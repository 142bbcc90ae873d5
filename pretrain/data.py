"""Streaming token batches from a shard folder, by global sample position, exactly resumable.

The training stream is an infinite sequence of global positions P = 0, 1, 2, ... With N samples
in the split, P is sample i = P % N of epoch e = P // N. Each epoch has its own seeded order: a
permutation of the shards and, inside each shard, a rotation of its samples (the shards were
shuffled when they were written, so a contiguous run of samples is already a random one). Epoch
index i maps to a (shard, sample) pair through the cumulative sample counts in that order.

Optimizer step s consumes the global batch of positions [s*B, (s+1)*B), split rank-major: data
parallel rank r gets [s*B + r*A*mb, s*B + (r+1)*A*mb) as A micro-batches of mb consecutive
positions (A = B // (dp * mb)). Hence:

* the union of all ranks' micro-batches of a step is the same set of samples for any dp, micro
  batch size and number of DataLoader workers, so a run resumes exactly on another layout;
* each rank reads its own contiguous ranges and nothing else: there is no shard-to-rank
  assignment, so no rank is ever starved whatever the number of shards, ranks and workers;
* the whole loader state is one integer (the position of the next global batch), and resuming
  is O(1): the order of any epoch is recomputed from (seed, epoch), never replayed.

Orders depend only on (seed, epoch), never on ranks or workers. DataLoader worker w of W
produces this rank's micro-batches k = w, w + W, ...; the DataLoader takes items from its
workers round-robin, so the items arrive in exactly the order of k.

Unreadable data never hangs and never shifts which position holds which sample: a missing or
wrong-size shard (checked at construction) and a sample whose tar header fails its checks (at
read time) are delivered in place, zeroed, with ``valid=False``, and counted; past
``max_corrupt_fraction`` a `ShardError` names the shard and the fix.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tokenizer.format import Manifest, ShardError, ShardInfo, ShardReader, read_manifest
from tokenizer.tokenizers import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

REPAIR_HINT = ("re-create the shards with `proseco tokenizer shard` or find the damaged files with "
               "`proseco tokenizer verify {folder}`")
SCAN_CHUNK = 1024
"""Samples per read when a damaged shard is scanned whole (bounds the memory of the scan)."""


# ---------------------------------------------------------------------------------------------
# Opening a split


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split of an opened folder, with the ones found unusable at opening."""

    folder: Path
    split: str
    seq_len: int
    dtype: str
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
                         infos=tuple(info.shards), paths=paths, counts=counts, bad=bad)
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


# ---------------------------------------------------------------------------------------------
# Epoch orders: global position -> (shard, sample)


@dataclass(frozen=True)
class Piece:
    """Consecutive positions held by samples [start, stop) of one shard."""

    shard: int
    start: int
    stop: int


class EpochOrder:
    """The seeded order of every epoch: a shard permutation and a rotation inside each shard."""

    def __init__(self, counts: Sequence[int], seed: int, shuffle: bool):
        if seed < 0:
            raise ValueError(f"the data seed must be >= 0, got {seed}")
        self.counts = [int(c) for c in counts]
        self.samples = sum(self.counts)
        if self.samples <= 0:
            raise ValueError("an epoch order needs at least one sample")
        self.seed, self.shuffle = seed, shuffle
        self._cache: dict[int, tuple[list[int], list[int], list[int], np.ndarray]] = {}

    def epoch(self, epoch: int) -> tuple[list[int], list[int], list[int], np.ndarray]:
        """Shard order, rotation of each shard in that order, cumulative sample count at each one's
        end (as a list for cheap indexing and as an array for binary search)."""
        if epoch not in self._cache:
            counts = np.asarray(self.counts, dtype=np.int64)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                order = rng.permutation(len(counts))
                rotation = rng.integers(0, np.maximum(counts[order], 1))
            else:
                order = np.arange(len(counts))
                rotation = np.zeros(len(counts), dtype=np.int64)
            ends = np.cumsum(counts[order])
            if len(self._cache) >= 4:  # a stream only ever needs the current and the next epoch
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = (order.tolist(), rotation.tolist(), ends.tolist(), ends)
        return self._cache[epoch]

    def pieces(self, start: int, stop: int) -> list[Piece]:
        """The shard ranges holding positions [start, stop), in position order."""
        out: list[Piece] = []
        position = start
        while position < stop:
            epoch, index = divmod(position, self.samples)
            order, rotation, ends, ends_array = self.epoch(epoch)
            slot = int(np.searchsorted(ends_array, index, side="right"))
            while position < stop and slot < len(order):
                shard = order[slot]
                count = self.counts[shard]
                if count == 0:
                    slot += 1
                    continue
                offset = index - (ends[slot] - count)
                take = min(count - offset, stop - position)
                first = (rotation[slot] + offset) % count
                head = min(take, count - first)
                out.append(Piece(shard, first, first + head))
                if take > head:  # the rotation wraps around the end of the shard
                    out.append(Piece(shard, 0, take - head))
                position += take
                index += take
                slot += 1
        return out


# ---------------------------------------------------------------------------------------------
# Reading


class SampleReader:
    """Reads pieces of shards in one process; keeps one `ShardReader` per shard it touched.

    A sample whose tar header fails its checks is returned zeroed and flagged. The first time a
    shard shows one, the whole shard is scanned once: this process then knows the shard's exact
    damage, and fails (or warns) the same way whichever of its samples were read first.
    """

    def __init__(self, shards: SplitShards, max_corrupt_fraction: float):
        self.shards = shards
        self.max_corrupt_fraction = max_corrupt_fraction
        self._readers: dict[int, ShardReader] = {}
        self._scanned: set[int] = set()

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
        try:
            tokens, ok = self._reader(piece.shard).read(piece.start, piece.stop)
        except OSError as err:
            path = self.shards.paths[piece.shard]
            raise ShardError(f"{path} became unreadable during training ({err}); "
                             + REPAIR_HINT.format(folder=self.shards.folder)) from None
        corrupt = ~ok
        if corrupt.any():
            tokens[corrupt] = 0  # garbage ids could exceed the vocabulary; zeros are inert
            self._scan(piece.shard)
        return tokens, corrupt

    def _reader(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            self._readers[shard] = ShardReader(self.shards.paths[shard], self.shards.infos[shard],
                                               self.shards.seq_len, self.shards.dtype)
        return self._readers[shard]

    def _scan(self, shard: int) -> None:
        """Count a damaged shard's unreadable samples once; raise past the allowed fraction."""
        if shard in self._scanned:
            return
        self._scanned.add(shard)
        reader, count, path = self._reader(shard), self.shards.counts[shard], self.shards.paths[shard]
        damaged = 0
        for start in range(0, count, SCAN_CHUNK):
            _, ok = reader.read(start, min(count, start + SCAN_CHUNK))
            damaged += int((~ok).sum())
        if damaged > self.max_corrupt_fraction * count:
            raise ShardError(f"{path}: {damaged} of {count} samples are unreadable (more than "
                             f"max_corrupt_fraction={self.max_corrupt_fraction}); "
                             + REPAIR_HINT.format(folder=self.shards.folder))
        logger.warning("%s: %d of %d samples are unreadable; they are delivered as valid=False", path, damaged, count)


# ---------------------------------------------------------------------------------------------
# Which positions each item of a rank holds


@dataclass(frozen=True)
class TrainSchedule:
    """Item k of a data-parallel rank in training: micro-batch k % A of global batch k // A."""

    start: int
    """Global position of the first global batch of the stream."""
    first_step: int
    """Step number of that global batch (only reported in the items)."""
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    @property
    def accum_steps(self) -> int:
        return self.global_batch_size // (self.dp_size * self.micro_batch_size)

    @property
    def num_items(self) -> int | None:
        return None  # training streams never end

    def item(self, k: int) -> tuple[int, int, int]:
        """(first position, step, micro-batch index) of item k."""
        batch, micro = divmod(k, self.accum_steps)
        first = (self.start + batch * self.global_batch_size
                 + (self.dp_rank * self.accum_steps + micro) * self.micro_batch_size)
        return first, self.first_step + batch, micro


@dataclass(frozen=True)
class EvalSchedule:
    """Evaluation batch k of rank r holds positions (k*dp + r)*mb + [0, mb), one pass, padded."""

    micro_batch_size: int
    dp_rank: int
    dp_size: int
    num_batches: int

    @property
    def num_items(self) -> int:
        return self.num_batches

    def item(self, k: int) -> tuple[int, int, int]:
        return (k * self.dp_size + self.dp_rank) * self.micro_batch_size, k, 0


class ShardStream(IterableDataset):
    """The items of one data-parallel rank; DataLoader worker w of W produces items w, w + W, ...

    Each item is a dict: ``tokens`` int64 [mb, L], ``position`` int64 [mb] (global positions;
    in evaluation the position of the sample held), ``valid`` bool [mb], ``step`` and ``micro``
    ints, and ``corrupt`` (unreadable samples in this item, so that worker processes can report
    them to the main process). The arrays are numpy here; `TrainLoader` and `EvalLoader` hand
    them out as torch tensors.
    """

    def __init__(self, shards: SplitShards, order: EpochOrder, schedule: TrainSchedule | EvalSchedule,
                 max_corrupt_fraction: float, limit: int | None = None):
        super().__init__()
        self.shards, self.order, self.schedule = shards, order, schedule
        self.max_corrupt_fraction = max_corrupt_fraction
        self.limit = limit
        """One-pass mode: positions >= limit are padding (valid=False), holding sample position % limit."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        reader = SampleReader(self.shards, self.max_corrupt_fraction)
        total = self.schedule.num_items
        k = worker_id
        while total is None or k < total:
            yield self.make_item(reader, k)
            k += workers

    def make_item(self, reader: SampleReader, k: int) -> dict[str, Any]:
        first, step, micro = self.schedule.item(k)
        mb = self.schedule.micro_batch_size
        tokens, corrupt = reader.read(self.order.pieces(first, first + mb), mb)
        positions = np.arange(first, first + mb, dtype=np.int64)
        if self.limit is not None:
            real = positions < self.limit
            corrupt &= real  # padding is not damage
            valid = real & ~corrupt
            positions %= self.limit
        else:
            valid = ~corrupt
        return {"tokens": tokens, "position": positions, "valid": valid, "step": step, "micro": micro,
                "corrupt": int(corrupt.sum())}


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    """DataLoader collate function that leaves the worker's numpy arrays alone (see `_items`)."""
    return item


def _to_torch(item: dict[str, Any], pin_memory: bool) -> dict[str, Any]:
    for key in ("tokens", "position", "valid"):
        tensor = torch.from_numpy(item[key])  # no copy
        item[key] = tensor.pin_memory() if pin_memory else tensor
    return item


def _ignore_preemption_signals(worker_id: int) -> None:
    """Slurm signals every process of a job step on preemption. Workers leave SIGTERM/SIGUSR1 to
    the training process, which saves a checkpoint and then shuts them down; a worker that died
    of the signal would make the DataLoader raise before the checkpoint is written."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _items(stream: ShardStream, num_workers: int, pin_memory: bool) -> Generator[dict[str, Any], None, None]:
    """The stream's items as tensors, read in this process or by `num_workers` worker processes.

    Workers send numpy arrays, which travel pickled through the result pipe: for batches of a
    few hundred KB that is several times cheaper than the DataLoader's default of one shared
    memory segment per tensor (measured with 2 workers and items of 32 x 128 tokens: 6 M
    tokens/s against 1.7 M, ~2.4 ms per item). Pinning, if asked for, happens here too.
    """
    pin_memory = pin_memory and torch.cuda.is_available()  # as the DataLoader: nothing to pin for on CPU
    if num_workers == 0:
        for item in stream:
            yield _to_torch(item, pin_memory)
        return
    iterator = iter(DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
                               worker_init_fn=_ignore_preemption_signals))
    try:
        for item in iterator:
            yield _to_torch(item, pin_memory)
    finally:
        # Stop the workers now. Left to the garbage collector (an exception's traceback keeps the
        # iterator alive in a cycle), the queues can be finalized before the workers are told to
        # exit, and the DataLoader then waits 5 s per iterator before killing them.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# ---------------------------------------------------------------------------------------------
# Training


class TrainLoader:
    """The training stream of one data-parallel rank, resumable from `state_dict()` on any layout.

    Iterating yields micro-batches forever (A per optimizer step, A = B // (dp * mb)). Pass the
    data-parallel rank and size, not the global ones: every rank of a tensor/pipeline group must
    read the same batches. `state_dict()` must be called between optimizer steps.
    """

    def __init__(self, folder: str | Path, *, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, num_workers: int = 1, seed: int = 0, shuffle: bool = True,
                 max_corrupt_fraction: float = 0.01, expected_tokenizer_sha256: str | None = None,
                 split: str = "train", pin_memory: bool = False):
        _check_layout(micro_batch_size, dp_rank, dp_size, num_workers)
        if global_batch_size % (dp_size * micro_batch_size) or global_batch_size <= 0:
            raise ValueError(f"global_batch_size={global_batch_size} is not a positive multiple of dp_size x "
                             f"micro_batch_size = {dp_size} x {micro_batch_size}")
        self.manifest, self.shards = open_split(folder, split, expected_tokenizer_sha256=expected_tokenizer_sha256,
                                                max_corrupt_fraction=max_corrupt_fraction)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.seed, self.shuffle, self.split = seed, shuffle, split
        self.max_corrupt_fraction, self.pin_memory = max_corrupt_fraction, pin_memory
        self.accum_steps = global_batch_size // (dp_size * micro_batch_size)
        self.corrupt_samples = 0
        """Unreadable samples delivered so far by this rank (valid=False), all workers together."""
        self._position = 0
        self._step = 0
        self._micro = 0  # micro-batches of the current global batch already handed out
        self._generation = 0  # bumped by every iter() and load_state_dict(): older iterators stop

    @property
    def samples(self) -> int:
        """Samples in one epoch of the split."""
        return self.shards.samples

    @property
    def corrupt_shards(self) -> list[Path]:
        """Shards found missing or of the wrong size when the loader was built."""
        return [self.shards.paths[i] for i in sorted(self.shards.bad)]

    @property
    def position(self) -> int:
        """Global position of the next global batch not yet fully handed out."""
        return self._position

    @property
    def step(self) -> int:
        """Global batches fully handed out since the start of training."""
        return self._step

    @property
    def epoch(self) -> float:
        return self._position / self.samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._micro:
            raise RuntimeError(f"iteration restarted after micro-batch {self._micro} of {self.accum_steps} of step "
                               f"{self._step}; restart only between optimizer steps (or load a state first)")
        self._generation += 1
        schedule = TrainSchedule(start=self._position, first_step=self._step, global_batch_size=self.global_batch_size,
                                 micro_batch_size=self.micro_batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size)
        stream = ShardStream(self.shards, EpochOrder(self.shards.counts, self.seed, self.shuffle), schedule,
                             self.max_corrupt_fraction)
        return self._consume(_items(stream, self.num_workers, self.pin_memory), self._generation)

    def _consume(self, items: Generator[dict[str, Any], None, None], generation: int) -> Iterator[dict[str, Any]]:
        try:
            for item in items:
                if generation != self._generation:
                    raise RuntimeError("this iterator is stale: the loader was restarted or load_state_dict() was "
                                       "called; iterate the loader again")
                if (item["step"], item["micro"]) != (self._step, self._micro):  # a bug, not bad data
                    raise RuntimeError(f"data loader out of order: got step {item['step']} micro {item['micro']}, "
                                       f"expected step {self._step} micro {self._micro}")
                self.corrupt_samples += item["corrupt"]
                self._micro += 1
                if self._micro == self.accum_steps:
                    self._micro = 0
                    self._step += 1
                    self._position += self.global_batch_size
                yield item
        finally:
            items.close()  # stops the worker processes now, not whenever the garbage collector runs

    def state_dict(self) -> dict[str, Any]:
        """The position of the next global batch and what the order depends on (a few scalars)."""
        if self._micro:
            raise RuntimeError(f"state_dict() called after micro-batch {self._micro} of {self.accum_steps} of step "
                               f"{self._step}: the data position is only defined between optimizer steps")
        return {"position": self._position, "step": self._step, "fingerprint": self.manifest.fingerprint,
                "seed": self.seed, "shuffle": self.shuffle, "split": self.split, "samples": self.samples,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any], *, ignore_fingerprint: bool = False) -> None:
        """Continue from a saved position, on any dp size, micro-batch size, worker count or batch size.

        The saved seed and shuffle flag win over the constructor's, so the order is the saved run's.
        Iterate the loader again afterwards: existing iterators stop.
        """
        missing = {"position", "step", "fingerprint", "seed", "shuffle"} - set(state)
        if missing:
            raise ValueError(f"not a data loader state (missing {', '.join(sorted(missing))})")
        if state["fingerprint"] != self.manifest.fingerprint and not ignore_fingerprint:
            raise ShardError(f"the saved data position belongs to shards with fingerprint {state['fingerprint']}, but "
                             f"{self.shards.folder} has fingerprint {self.manifest.fingerprint}: resuming would read "
                             "other samples than the run was going to. Point data.shards at the folder the run "
                             "started with, or pass ignore_fingerprint=True to continue on these shards from the "
                             f"saved position {state['position']}")
        if state.get("split", self.split) != self.split:
            raise ValueError(f"the saved state is for split {state['split']!r}, this loader reads {self.split!r}")
        if (state["seed"], state["shuffle"]) != (self.seed, self.shuffle):
            logger.warning("resuming the data order of seed=%s shuffle=%s (saved), not seed=%s shuffle=%s",
                           state["seed"], state["shuffle"], self.seed, self.shuffle)
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self._position, self._step, self._micro = int(state["position"]), int(state["step"]), 0
        self._generation += 1


def _check_layout(micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


# ---------------------------------------------------------------------------------------------
# Validation


class EvalLoader:
    """One pass over a split in manifest order; every rank yields the same number of batches.

    Batch k of rank r holds positions (k*dp + r)*mb + [0, mb) of the split; positions past its
    end repeat samples from its start with ``valid=False``, so that collective evaluation steps
    never wait for a rank that ran out. Iterate again for another identical pass.
    """

    def __init__(self, folder: str | Path, split: str = "val", *, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, max_batches: int | None = None, num_workers: int = 0,
                 max_corrupt_fraction: float = 0.01, expected_tokenizer_sha256: str | None = None,
                 pin_memory: bool = False):
        _check_layout(micro_batch_size, dp_rank, dp_size, num_workers)
        self.manifest, self.shards = open_split(folder, split, expected_tokenizer_sha256=expected_tokenizer_sha256,
                                                max_corrupt_fraction=max_corrupt_fraction)
        full = math.ceil(self.shards.samples / (dp_size * micro_batch_size))
        self.num_batches = full if max_batches is None else max(0, min(full, max_batches))
        self.schedule = EvalSchedule(micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                     num_batches=self.num_batches)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.max_corrupt_fraction = max_corrupt_fraction
        self.corrupt_samples = 0
        """Unreadable samples among the split's real positions, over all passes so far."""

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = EpochOrder(self.shards.counts, seed=0, shuffle=False)
        stream = ShardStream(self.shards, order, self.schedule, self.max_corrupt_fraction, limit=self.shards.samples)
        items = _items(stream, self.num_workers, self.pin_memory)
        try:
            for item in items:
                self.corrupt_samples += item["corrupt"]
                yield item
        finally:
            items.close()


def eval_batches(folder: str | Path, split: str = "val", *, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, max_batches: int | None = None, num_workers: int = 0,
                 max_corrupt_fraction: float = 0.01, expected_tokenizer_sha256: str | None = None,
                 pin_memory: bool = False) -> EvalLoader:
    """The evaluation batches of one data-parallel rank (an iterable with len(); see `EvalLoader`)."""
    return EvalLoader(folder, split, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                      max_batches=max_batches, num_workers=num_workers, max_corrupt_fraction=max_corrupt_fraction,
                      expected_tokenizer_sha256=expected_tokenizer_sha256, pin_memory=pin_memory)
