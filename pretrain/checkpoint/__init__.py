"""Distributed checkpoints (DCP): atomic, verified, rotating, optionally asynchronous, reshardable.

A checkpoint is a folder `step_XXXXXXXX/` holding DCP shards (model, optimizer, EMA, each keyed
by parameter name, so they load into any other dp/tp/pp layout), `meta.json` (step, data
position, tokens seen, the resolved config, the layout it was saved from) and `manifest.json`
(size and SHA-256 of every other file). It is written as `step_XXXXXXXX.tmp/` and renamed only
once every rank has written and hashed its files and meta.json and the manifest are in place: a
crash, a kill or a full disk mid-save leaves a `.tmp` folder that is never taken as the latest and
is removed at the next start. The RNG needs no saved state: every random draw is keyed by
(seed, step, sample position) or reseeded every step (parallel/rng.py).

Every load checks the checkpoint first (integrity.py) and never runs code from it (safe.py); a
resume skips damaged checkpoints for the newest one that passes, and rotation never deletes the
last good one for a bad one (store.py).

    folder.py     names, listing, meta.json          safe.py       DCP loads that never unpickle code
    integrity.py  digests at save, checks at load    store.py      Checkpointer: save, rotate, resume point
    inference.py  load_model, consolidate
    deepspeed.py  a DeepSpeed engine's checkpoint (DeepSpeed's files in deepspeed/) as a DCP one
"""

from pretrain.checkpoint.folder import (
    META,
    checkpoint_name,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
    step_folders,
)
from pretrain.checkpoint.inference import consolidate, load_model, resolve_checkpoint
from pretrain.checkpoint.integrity import VerifyMode, checkpoint_problem, require_verified
from pretrain.checkpoint.safe import dcp_load, read_dcp_metadata
from pretrain.checkpoint.store import Checkpointer, app_state, load_app_state

__all__ = ["META", "Checkpointer", "VerifyMode", "app_state", "checkpoint_name", "checkpoint_problem", "consolidate",
           "dcp_load", "is_complete", "latest_checkpoint", "list_checkpoints", "load_app_state",
           "load_model", "read_dcp_metadata", "read_meta", "require_verified", "resolve_checkpoint", "step_folders"]
