"""Reading a DCP checkpoint without running code from it.

torch.distributed.checkpoint unpickles two things with the full pickle machinery, so a crafted
checkpoint runs any code it likes on load: `.metadata` (FileSystemReader.read_metadata calls
`pickle.load`) and non-tensor values such as optimizer hyper-parameters (DefaultLoadPlanner.load_bytes
calls `torch.load(weights_only=False)`). Tensors themselves are read with `weights_only=True`.
Every load in this project goes through `dcp_load`, which swaps in a reader whose unpickler knows
only the classes DCP metadata is made of, and a planner that loads values with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from pretrain.checkpoint.folder import DCP_METADATA
from pretrain.errors import CheckpointError

_PATHS = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
# What DCP's Metadata pickles to (checked against torch 2.6-2.13): its dataclasses, the storage
# info of the file system writer, torch.Size, layouts (rebuilt by name) and the checkpoint path.
# Every one of them only builds a value when called; none reads, writes or runs anything.
_ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    *((module, name) for module in ("pathlib", "pathlib._local") for name in _PATHS),  # _local: Python 3.13+
}


class _Refused(Exception):
    """A global outside the allow-list (its dotted name is the message)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Checked before anything is imported: importing a module can itself run code.
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(vars(torch).get(name), torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def read_dcp_metadata(file: Path) -> Metadata:
    """DCP's `.metadata`, unpickled with an allow-list; CheckpointError names the file and, for a
    crafted one, the global it asked for."""
    try:
        with open(file, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except _Refused as err:
        raise CheckpointError(f"refused to unpickle the global {err} in {file}: DCP metadata never needs it, so "
                              "the file was crafted (or is not a checkpoint's); do not load it") from None
    except Exception as err:  # a damaged pickle can fail in any way: EOF, bad opcode, bad arguments...
        raise CheckpointError(f"{file} is unreadable ({type(err).__name__}: {_first_line(err)})") from None
    if not (isinstance(metadata, Metadata) and isinstance(metadata.storage_data, dict)
            and isinstance(metadata.state_dict_metadata, dict)):
        raise CheckpointError(f"{file} does not hold DCP metadata (a {type(metadata).__name__})")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file system reader with `.metadata` read by `read_dcp_metadata` instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")  # DCP asks for a rank's own metadata when there is no global one
        metadata = read_dcp_metadata(Path(self.path) / (DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"))
        if getattr(metadata, "storage_meta", None) is None:  # as the base class does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor values unpickled by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL (\S+)", str(err))
            what = f"the global {found.group(1)}" if found else _first_line(err)
            raise CheckpointError(f"refused to unpickle the value of {read_item.dest_index.fqn} ({what}): the "
                                  "checkpoint was crafted; do not load it") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


@contextlib.contextmanager
def dcp_quietly():
    """DCP warns at every single-process save and load that it assumes one process, even when
    told so (no_dist=True); in a one-process run that is the intent, not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dcp_load(state: dict, path: Path, no_dist: bool) -> None:
    """dcp.load of `state` in place from `path`, through SafeReader and SafePlanner. DCP's own
    CheckpointException (a BaseException, with every rank's traceback) becomes one CheckpointError line."""
    try:
        with dcp_quietly():
            dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner(), no_dist=no_dist)
    except CheckpointException as err:
        failures = [failure[0] for failure in err.failures.values()] or [err]
        ours = next((f for f in failures if isinstance(f, CheckpointError)), None)
        if ours is not None:
            raise CheckpointError(f"cannot load {path}: {ours}") from None
        first = failures[0]
        raise CheckpointError(f"cannot load {path} ({type(first).__name__}: {_first_line(first)}); was it saved "
                              "with another model config, or is it damaged?") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
