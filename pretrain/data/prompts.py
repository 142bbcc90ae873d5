"""Prompt lengths of an SFT shard folder (``proseco tokenizer shard --packing sft``): reading them.

A folder of prompt/response samples keeps, beside its shards, ``prompt_lengths/info.json`` (the
manifest fingerprint of the shards, the sha256 and sample count of each split's array, the
template the prompts were rendered with) and ``prompt_lengths/{split}.npy``: one uint32 per sample
of that split, in manifest order (shard after shard, sample after sample inside each), the number
of leading tokens of the sample (its BOS included) that are prompt. tokenizer/sft.py writes them.
They are looked up by the same (shard, sample) pieces the loader reads tokens by, so exact resume
and every layout see each sample with its own prompt length.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.data.labels import per_sample
from pretrain.data.order import Piece
from pretrain.errors import UserError
from tokenizer.sft import SFT_PACKING, prompt_files
from tokenizer.storage import DEFAULT_POLICY, ReadPolicy, Store

__all__ = ["SFT_PACKING", "PromptLengthError", "SplitPromptLengths", "open_prompt_lengths"]


class PromptLengthError(UserError):
    """Prompt lengths that are missing, damaged, or written for other shards."""


@dataclass(frozen=True)
class SplitPromptLengths:
    """The prompt lengths of one split, and how to find those of the samples a loader item holds."""

    values: np.ndarray
    offsets: np.ndarray
    """Index in `values` of each shard's first sample."""

    def of(self, pieces: Sequence[Piece], n: int) -> np.ndarray:
        """The prompt lengths of the samples `pieces` hold, in the loader's row order, int64 [n]
        (rows past the pieces, the padding of a short last batch, get 0: they never count)."""
        return per_sample(self.values, self.offsets, pieces, n)


def open_prompt_lengths(folder: str | Path, split: str, counts: Sequence[int], fingerprint: str, seq_len: int,
                        policy: ReadPolicy = DEFAULT_POLICY) -> SplitPromptLengths:
    """The prompt lengths of `split` of the SFT shard folder `folder`, checked against its shards:
    their manifest fingerprint, the array's recorded sha256, the split's per-shard sample counts,
    and every length leaving at least one response token in `seq_len`."""
    store = Store(folder, policy)
    info_path, values_path = prompt_files(split)
    fix = f"re-create the folder with `proseco tokenizer shard --packing sft ... --out {folder} --overwrite`"
    try:
        info = json.loads(store.read_bytes(info_path))
    except (FileNotFoundError, NotADirectoryError):
        raise PromptLengthError(f"{store.url(info_path)} does not exist, but the manifest says the folder holds "
                                f"prompt/response samples; {fix}") from None
    except ValueError as err:
        raise PromptLengthError(f"{store.url(info_path)} is not valid JSON ({err}); {fix}") from None
    if info.get("fingerprint") != fingerprint:
        raise PromptLengthError(f"{store.url(info_path)} was written for other shards (fingerprint "
                                f"{info.get('fingerprint')!r}, the shards' is {fingerprint!r}); {fix}")
    recorded = info.get("splits", {}).get(split, {})
    try:
        raw = store.read_bytes(values_path)
    except (FileNotFoundError, NotADirectoryError, OSError) as err:
        raise PromptLengthError(f"cannot read {store.url(values_path)} ({err}); {fix}") from None
    if hashlib.sha256(raw).hexdigest() != recorded.get("sha256"):
        raise PromptLengthError(f"{store.url(values_path)} differs from the sha256 {info_path} records (altered "
                                f"or replaced); {fix}")
    values = np.load(io.BytesIO(raw), allow_pickle=False)
    total = int(sum(counts))
    if values.shape != (total,) or (total and not (values.min() >= 1 and values.max() < seq_len)):
        raise PromptLengthError(f"{store.url(values_path)} holds {values.shape} prompt lengths, the split has "
                                f"{total} samples of {seq_len} tokens (each prompt length in [1, {seq_len - 1}]); "
                                f"{fix}")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return SplitPromptLengths(values.astype(np.int64), offsets)
