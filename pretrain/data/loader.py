"""The training and evaluation loaders: which positions each item of a rank holds, the
DataLoader workers that read them, and the one-integer resumable state."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.labels import SplitLabels, open_labels
from pretrain.data.order import EpochOrder, Piece
from pretrain.data.prompts import SFT_PACKING, SplitPromptLengths, open_prompt_lengths
from pretrain.data.shards import SampleReader, SplitShards, open_split
from pretrain.errors import UserError
from tokenizer.format import ShardError
from tokenizer.storage import DEFAULT_POLICY, ReadPolicy

logger = logging.getLogger(__name__)

DEFAULT_PREFETCH = 8
"""Micro-batches each reading process fetches ahead (data.prefetch)."""


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
                 max_corrupt_fraction: float, limit: int | None = None, verify_digests: bool = True,
                 prefetch: int = 0, labels: SplitLabels | None = None,
                 prompt_lengths: SplitPromptLengths | None = None):
        super().__init__()
        self.shards, self.order, self.schedule = shards, order, schedule
        self.labels = labels
        """Conditioning labels of the split (data.labels): items then carry each sample's class."""
        self.prompt_lengths = prompt_lengths
        """Prompt lengths of an SFT split: items then carry each sample's ``prompt_length``."""
        self.max_corrupt_fraction, self.verify_digests = max_corrupt_fraction, verify_digests
        self.limit = limit
        """One-pass mode: positions >= limit are padding (valid=False), holding sample position % limit."""
        self.prefetch = prefetch
        """Items whose bytes each reading process fetches ahead, in as many threads (0: none)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        reader = SampleReader(self.shards, self.max_corrupt_fraction, self.verify_digests)
        total = self.schedule.num_items
        ks = range(worker_id, total, workers) if total is not None else _count(worker_id, workers)
        try:
            for k, fetched in self._fetched(reader, iter(ks)):
                yield self.make_item(reader, k, fetched)
        except UserError as err:
            if worker is None:
                raise
            # From a worker, the DataLoader would re-raise it wrapped in the worker's traceback;
            # sent as data, the training process raises it as it is (one line from the CLI).
            yield {"error": err}

    def _fetched(self, reader: SampleReader, ks: Iterator[int]) -> Iterator[tuple[int, Any]]:
        """(k, the bytes of item k) in the order of `ks`. The schedule says exactly which bytes come
        next, so up to `prefetch` items are fetched ahead in threads: memory is bounded by
        `prefetch` items, and a slow or retried request delays its item without reordering any."""
        if self.prefetch == 0:
            for k in ks:
                yield k, reader.fetch(self._pieces(k))
            return
        pool = ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="shard-fetch")
        pending: deque[tuple[int, Future]] = deque()
        try:
            for k in ks:
                pending.append((k, pool.submit(reader.fetch, self._pieces(k))))
                if len(pending) > self.prefetch:
                    k_next, future = pending.popleft()
                    yield k_next, future.result()
            while pending:
                k_next, future = pending.popleft()
                yield k_next, future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a stopped stream does not wait for reads ahead

    def _pieces(self, k: int) -> list[Piece]:
        first = self.schedule.item(k)[0]
        return self.order.pieces(first, first + self.schedule.micro_batch_size)

    def make_item(self, reader: SampleReader, k: int, fetched: Any = None) -> dict[str, Any]:
        first, step, micro = self.schedule.item(k)
        mb = self.schedule.micro_batch_size
        pieces = self.order.pieces(first, first + mb)
        tokens, corrupt = reader.assemble(pieces, mb, reader.fetch(pieces) if fetched is None else fetched)
        positions = np.arange(first, first + mb, dtype=np.int64)
        if self.limit is not None:
            real = positions < self.limit
            corrupt &= real  # padding is not damage
            valid = real & ~corrupt
            positions %= self.limit
        else:
            valid = ~corrupt
        item = {"tokens": tokens, "position": positions, "valid": valid, "step": step, "micro": micro,
                "corrupt": int(corrupt.sum())}
        if self.labels is not None:
            item["label"] = self.labels.of(pieces, mb)
        if self.prompt_lengths is not None:
            item["prompt_length"] = self.prompt_lengths.of(pieces, mb)
        return item


def _count(start: int, step: int) -> Iterator[int]:
    while True:
        yield start
        start += step


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    """DataLoader collate function that leaves the worker's numpy arrays alone (see `_items`)."""
    return item


def _to_torch(item: dict[str, Any], pin_memory: bool) -> dict[str, Any]:
    for key in ("tokens", "position", "valid", "label", "prompt_length"):
        if key not in item:  # "label" only with data.labels, "prompt_length" only from SFT folders
            continue
        tensor = torch.from_numpy(item[key])  # no copy
        item[key] = tensor.pin_memory() if pin_memory else tensor
    return item


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this worker the moment its training process dies (Linux).

    A forked worker holds copies of the parent's sockets, the process group's included: if it
    outlived a rank that died, the other ranks would not see the connection drop until the
    worker noticed on its own (its watchdog polls every 5 s), and would wait that long for it."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the DataLoader's watchdog remains
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _init_worker(worker_id: int) -> None:
    """Slurm signals every process of a job step on preemption, a terminal every process of the
    foreground group on Ctrl-C. Workers leave SIGTERM/SIGUSR1/SIGINT to the training process,
    which saves a checkpoint and then shuts them down; a worker that died of the signal would make
    the DataLoader raise before the checkpoint is written. A worker never outlives the training
    process (`_die_with_parent`)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()


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
                               worker_init_fn=_init_worker))
    try:
        for item in iterator:
            if "error" in item:
                raise item["error"]
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
                 split: str = "train", pin_memory: bool = False, verify_digests: bool = True,
                 prefetch: int = DEFAULT_PREFETCH, read_policy: ReadPolicy = DEFAULT_POLICY,
                 labels: str | None = None):
        _check_layout(micro_batch_size, dp_rank, dp_size, num_workers, prefetch)
        if global_batch_size % (dp_size * micro_batch_size) or global_batch_size <= 0:
            raise ValueError(f"global_batch_size={global_batch_size} is not a positive multiple of dp_size x "
                             f"micro_batch_size = {dp_size} x {micro_batch_size}")
        self.manifest, self.shards = open_split(folder, split, expected_tokenizer_sha256=expected_tokenizer_sha256,
                                                max_corrupt_fraction=max_corrupt_fraction, policy=read_policy)
        self.labels = _labels(folder, labels, split, self.manifest, self.shards, read_policy)
        self.prompt_lengths = _prompt_lengths(folder, split, self.manifest, self.shards, read_policy)
        self.prefetch = prefetch
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.seed, self.shuffle, self.split = seed, shuffle, split
        self.max_corrupt_fraction, self.pin_memory = max_corrupt_fraction, pin_memory
        self.verify_digests = verify_digests
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
                             self.max_corrupt_fraction, verify_digests=self.verify_digests, prefetch=self.prefetch,
                             labels=self.labels, prompt_lengths=self.prompt_lengths)
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


def _check_layout(micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int, prefetch: int) -> None:
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
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

    The pass covers the split's first `max_samples` samples (all of them by default): the same
    samples whatever the layout. Batch k of rank r holds positions (k*dp + r)*mb + [0, mb); positions
    past the covered ones repeat samples from the start with ``valid=False``, so that collective
    evaluation steps never wait for a rank that ran out. Iterate again for another identical pass.
    """

    def __init__(self, folder: str | Path, split: str = "val", *, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, max_samples: int | None = None, num_workers: int = 0,
                 max_corrupt_fraction: float = 0.01, expected_tokenizer_sha256: str | None = None,
                 pin_memory: bool = False, verify_digests: bool = True, prefetch: int = DEFAULT_PREFETCH,
                 read_policy: ReadPolicy = DEFAULT_POLICY, labels: str | None = None):
        _check_layout(micro_batch_size, dp_rank, dp_size, num_workers, prefetch)
        self.manifest, self.shards = open_split(folder, split, expected_tokenizer_sha256=expected_tokenizer_sha256,
                                                max_corrupt_fraction=max_corrupt_fraction, policy=read_policy)
        self.labels = _labels(folder, labels, split, self.manifest, self.shards, read_policy)
        self.prompt_lengths = _prompt_lengths(folder, split, self.manifest, self.shards, read_policy)
        self.prefetch = prefetch
        self.verify_digests = verify_digests
        self.samples = self.shards.samples if max_samples is None else max(0, min(self.shards.samples, max_samples))
        self.num_batches = math.ceil(self.samples / (dp_size * micro_batch_size))
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
        stream = ShardStream(self.shards, order, self.schedule, self.max_corrupt_fraction, limit=self.samples,
                             verify_digests=self.verify_digests, prefetch=self.prefetch, labels=self.labels,
                             prompt_lengths=self.prompt_lengths)
        items = _items(stream, self.num_workers, self.pin_memory)
        try:
            for item in items:
                self.corrupt_samples += item["corrupt"]
                yield item
        finally:
            items.close()


def eval_batches(folder: str | Path, split: str = "val", *, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, max_samples: int | None = None, num_workers: int = 0,
                 max_corrupt_fraction: float = 0.01, expected_tokenizer_sha256: str | None = None,
                 pin_memory: bool = False, verify_digests: bool = True, prefetch: int = DEFAULT_PREFETCH,
                 read_policy: ReadPolicy = DEFAULT_POLICY, labels: str | None = None) -> EvalLoader:
    """The evaluation batches of one data-parallel rank (an iterable with len(); see `EvalLoader`)."""
    return EvalLoader(folder, split, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                      max_samples=max_samples, num_workers=num_workers, max_corrupt_fraction=max_corrupt_fraction,
                      expected_tokenizer_sha256=expected_tokenizer_sha256, pin_memory=pin_memory,
                      verify_digests=verify_digests, prefetch=prefetch, read_policy=read_policy, labels=labels)


def _labels(folder: str | Path, name: str | None, split: str, manifest, shards: SplitShards,
            policy: ReadPolicy) -> SplitLabels | None:
    """The label set `name` of the opened split, checked against its shards (None: no labels)."""
    if name is None:
        return None
    return open_labels(folder, name, split, shards.counts, manifest.fingerprint, policy)


def _prompt_lengths(folder: str | Path, split: str, manifest, shards: SplitShards,
                    policy: ReadPolicy) -> SplitPromptLengths | None:
    """The prompt lengths of an SFT folder's split (manifest packing "sft"), checked against its
    shards; None for any other folder. The folder alone decides: SFT data trains response-only."""
    if manifest.packing != SFT_PACKING:
        return None
    return open_prompt_lengths(folder, split, shards.counts, manifest.fingerprint, manifest.seq_len, policy)
