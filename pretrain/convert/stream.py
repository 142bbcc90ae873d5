"""Weights stored in safetensors files, read into this rank's parameter shards one parameter at a time.

Which stored tensors make a parameter is the family's `weight_sources` (the per-tensor inverse
of its export mapping, in the published layout or this framework's). Then, per parameter:

- one stored tensor, renamed: only the block of it that this rank's shard holds is read
  (`safe_open(...).get_slice`: the rows of an FSDP or row-split tensor-parallel shard, rows and
  columns of a column-split one); a vocabulary parameter whose stored rows differ from this run's
  takes the rows of the real vocabulary that the shard meets and zeros after them, as
  `layouts.resize_vocab_rows` pads a whole one;
- several stored tensors, or one whose rows are permuted (the DiT's published attn_qkv order,
  the separate q/k/v of its earlier checkpoints): those tensors are read whole, combined, and
  the shard's part copied out.

Values are converted to the parameter's dtype as they are copied (exact from any float type). A
slice is read in pieces of at most READ_BYTES, and each read maps its file for that read alone
(the pages it touched leave with it), so a rank needs beyond its shards one such piece, or, for a
combined parameter, that one parameter's stored tensors and their combination: never the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import torch

from pretrain.convert.hf_folder import read_tensor
from pretrain.convert.layouts import check_weight, resize_vocab_rows
from pretrain.models import ModelConfig, ModelFamily
from pretrain.models.init import copy_full_into_local, local_part

READ_BYTES = 64 << 20  # at most this much (as float32) per read of a slice: its transient memory, whatever the size
Read = tuple[tuple[str, ...], Callable[[list[torch.Tensor]], torch.Tensor] | None]
"""The stored tensors a parameter is made of, and how (None: it is the one tensor, renamed)."""


def plan_reads(family: ModelFamily, cfg: ModelConfig, names: Iterable[str], stored: Collection[str],
               prefix: str = "", official: bool = False) -> dict[str, Read] | None:
    """Parameter name -> its Read, for every one of `names`, from the tensors `stored` (names as
    stored): in the published layout (`official`, full names), or this framework's under
    `prefix`. None where the family names no sources or some parameter's are not all stored
    (then the weights are read whole)."""
    if family.weight_sources is None:
        return None
    plan = {}
    for name in names:
        for keys, combine in family.weight_sources(name, cfg, official):
            keys = tuple(keys) if official else tuple(prefix + key for key in keys)
            if all(key in stored for key in keys):
                plan[name] = (keys, combine)
                break
        else:
            return None
    return plan


@torch.no_grad()
def stream_weights(params: dict[str, torch.Tensor], rows: int, plan: dict[str, Read], files: dict[str, Path],
                   shapes: dict[str, tuple[int, ...]], family: ModelFamily, vocab_size: int) -> None:
    """Each of `params` (name -> parameter, whole or this rank's DTensor shard) from the stored
    tensors its plan names (`files`: stored name -> file, `shapes`: -> stored shape), the family's
    vocabulary parameters re-padded to `rows` rows of which the first `vocab_size` are real."""
    for name, param in params.items():
        keys, combine = plan[name]
        vocab = name in family.vocab_parameters
        if combine is None:
            key = keys[0]
            # Stored rows that are this run's are kept as they are (padding rows too), as a whole
            # tensor's re-padding keeps them; else only the real vocabulary's are read.
            readable = vocab_size if vocab and shapes[key][0] != rows else shapes[key][0]
            _read_block(files[key], key, param, readable)
            continue
        tensors = [read_tensor(files[key], key) for key in keys]
        for key, tensor in zip(keys, tensors):
            check_weight(key, tensor)
        full = combine(tensors)
        del tensors
        if vocab:
            full = resize_vocab_rows(full, vocab_size, rows)
        copy_full_into_local(param, full)


def _read_block(file: Path, key: str, param: torch.Tensor, readable: int) -> None:
    """This rank's block of `param` from stored tensor `key` (the parameter renamed): the rows of
    its shard below `readable` read, the rows after them zero."""
    local, _, offset = local_part(param)
    if local.dim() == 0:
        block = read_tensor(file, key)
        check_weight(key, block)
        local.copy_(block)
        return
    first = offset[0]
    take = max(0, min(first + local.shape[0], readable) - first)
    columns = tuple(slice(start, start + size) for start, size in zip(offset[1:], local.shape[1:]))
    # In pieces of at most READ_BYTES of rows: reading a large shard (a vocabulary's, or a whole
    # parameter in one process) adds that much (twice: the mapped pages and the copy), not the
    # shard's size. An empty block (a shard of padding
    # rows only, or of no rows) is read too: its dtype is checked on every rank, so a bad file
    # fails them all rather than some.
    per_read = max(1, READ_BYTES // max(4 * math.prod(local.shape[1:]), 1))
    for start in range(0, max(take, 1), per_read):
        stop = min(start + per_read, take)
        block = read_tensor(file, key, (slice(first + start, first + stop) if take else slice(0, 0), *columns))
        check_weight(key, block)
        local[start:stop].copy_(block)
    local[take:].zero_()
