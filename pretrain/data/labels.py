"""Conditioning labels of a shard folder, for classifier-free guidance: reading them.

A label set sits beside the shards it labels, under ``labels/NAME/`` of the folder (local or at a
URL): ``labels.json`` says what the labels are (the property, its threshold, the number of
classes, the manifest fingerprint of the shards they were computed from) and ``{split}.npy``
holds one uint8 class per sample of that split, in manifest order (shard after shard, sample
after sample inside each). Labels are looked up by the same (shard, sample) pieces the loader
reads tokens by, so exact resume and every layout see the same label with the same sample.
`proseco label` writes them (pretrain/labeling.py).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.data.order import Piece
from pretrain.errors import UserError
from tokenizer.storage import DEFAULT_POLICY, ReadPolicy, Store

LABELS_DIR = "labels"
INFO_FILE = "labels.json"


class LabelError(UserError):
    """A label set that is missing, damaged, or computed from other shards."""


def label_files(name: str, split: str) -> tuple[str, str]:
    """The paths, relative to the shard folder, of a label set's description and of one split's labels."""
    return f"{LABELS_DIR}/{name}/{INFO_FILE}", f"{LABELS_DIR}/{name}/{split}.npy"


@dataclass(frozen=True)
class SplitLabels:
    """The labels of one split, and how to find those of the samples a loader item holds."""

    name: str
    num_classes: int
    """Classes 0..num_classes-1; guidance adds a null class, num_classes, for the unconditional branch."""
    values: np.ndarray
    offsets: np.ndarray
    """Index in `values` of each shard's first sample."""

    def of(self, pieces: Sequence[Piece], n: int) -> np.ndarray:
        """The labels of the samples `pieces` hold, in the loader's row order (rows past the pieces,
        the padding of a short last batch, get class 0: their samples never count)."""
        return per_sample(self.values, self.offsets, pieces, n)


def per_sample(values: np.ndarray, offsets: np.ndarray, pieces: Sequence[Piece], n: int) -> np.ndarray:
    """One value per sample of a split (`values`, in manifest order; `offsets`: the index of each
    shard's first sample) for the samples `pieces` hold, in the loader's row order, int64 [n];
    rows past the pieces (the padding of a short last batch) get 0."""
    out = np.zeros(n, dtype=np.int64)
    row = 0
    for piece in pieces:
        first = offsets[piece.shard]
        out[row: row + piece.stop - piece.start] = values[first + piece.start: first + piece.stop]
        row += piece.stop - piece.start
    return out


def open_labels(folder: str | Path, name: str, split: str, counts: Sequence[int], fingerprint: str,
                policy: ReadPolicy = DEFAULT_POLICY) -> SplitLabels:
    """The label set `name` of `split` of the shard folder `folder`, checked against the shards it
    is used with: their manifest fingerprint and their per-shard sample counts."""
    store = Store(folder, policy)
    info_path, values_path = label_files(name, split)
    try:
        info = json.loads(store.read_bytes(info_path))
    except (FileNotFoundError, NotADirectoryError):
        raise LabelError(f"{store.url(info_path)} does not exist: write the label set with "
                         f"`proseco label {folder} --property {name}`, or set data.labels to one that exists") from None
    except ValueError as err:
        raise LabelError(f"{store.url(info_path)} is not valid JSON ({err}); write it again with "
                         "`proseco label --overwrite`") from None
    if info.get("fingerprint") != fingerprint:
        raise LabelError(f"{store.url(info_path)} was computed from other shards (fingerprint "
                         f"{info.get('fingerprint')!r}, the shards' is {fingerprint!r}); write it again with "
                         f"`proseco label {folder} --property {name} --overwrite`")
    try:
        values = np.load(io.BytesIO(store.read_bytes(values_path)), allow_pickle=False)
    except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as err:
        raise LabelError(f"cannot read {store.url(values_path)} ({err}); write it again with `proseco label`") from None
    total = int(sum(counts))
    num_classes = int(info["num_classes"])
    if values.shape != (total,) or (len(values) and int(values.max()) >= num_classes):
        raise LabelError(f"{store.url(values_path)} holds {values.shape} labels below {num_classes}, the split "
                         f"has {total} samples; write it again with `proseco label --overwrite`")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return SplitLabels(name, num_classes, values.astype(np.uint8), offsets)
