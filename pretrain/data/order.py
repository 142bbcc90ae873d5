"""Epoch orders: a global stream position -> (shard, sample), from (seed, epoch) alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
