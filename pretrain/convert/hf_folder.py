"""The files of a Hugging Face model folder: config.json and the weights, one file or shards.

Written: `model.safetensors`, or above `max_shard_bytes` the shards `model-00001-of-0000N.safetensors`
with `model.safetensors.index.json` (weight name -> file, and the total size), as transformers
writes them. Read: the same, or the older `pytorch_model.bin` (and its sharded index), unpickled
with `torch.load(weights_only=True)`, which builds tensors and plain containers and refuses any
pickle that would import or call code. Nothing here knows a model family: names are the folder's.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pretrain.errors import CheckpointError
from pretrain.files import atomic_path, atomic_write_text

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' long-standing default shard size, "5GB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    found = _SIZE.match(text)
    if not found:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "B").upper()])


# -- writing ------------------------------------------------------------------------------------

def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Names per file, in order, each file at most `max_shard_bytes` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """The tensors as safetensors in `folder` (sharded with an index above `max_shard_bytes`);
    returns the file names written. Each file appears whole or not at all."""
    shards = plan_shards(tensors, max_shard_bytes)
    names = [SAFETENSORS] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, keys in zip(names, shards):
        with atomic_path(folder / file) as tmp:
            save_file({key: tensors[key].contiguous() for key in keys}, str(tmp), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: file for file, keys in zip(names, shards) for key in keys}}
        atomic_write_text(folder / SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
        names.append(SAFETENSORS_INDEX)
    return names


def write_config(folder: Path, config: dict) -> None:
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2) + "\n")


# -- reading ------------------------------------------------------------------------------------

def read_config(folder: Path) -> dict:
    """config.json of a model folder (CheckpointError if absent or not a JSON object)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder: it has no {CONFIG}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The files holding the weights: safetensors first (one file or an index), else pytorch_model.bin."""
    folder = Path(folder)
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return _indexed_files(folder, index)
    raise CheckpointError(f"{folder} holds no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} or "
                          f"{TORCH_BIN_INDEX}")


def _indexed_files(folder: Path, index: str) -> list[Path]:
    try:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{folder / index} is not a weight index ({type(err).__name__}: {err})") from None
    for name in files:
        # Plain names only: an index must not point outside its folder.
        if not isinstance(name, str) or Path(name).name != name or not (folder / name).is_file():
            raise CheckpointError(f"{folder / index} names the weight file {name!r}, which is not a file in {folder}")
    return [folder / name for name in files]


def read_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's weight files, reading headers where it can."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            with _safetensors(file) as handle:
                found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        else:
            found = {key: tuple(t.shape) for key, t in load_torch_state(file).items()}
        _merge(shapes, found, file)
    return shapes


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Name -> tensor of every tensor in the folder's weight files, on the CPU, as stored."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            with _safetensors(file) as handle:
                found = {key: handle.get_tensor(key) for key in handle.keys()}
        else:
            found = load_torch_state(file)
        _merge(tensors, found, file)
    return tensors


def tensor_files(folder: Path) -> dict[str, Path]:
    """Name -> the safetensors file that holds it, for every tensor of a folder whose weights are
    safetensors (one file or shards), from the headers alone."""
    where: dict[str, Path] = {}
    for file in weight_files(folder):
        with _safetensors(file) as handle:
            _merge(where, dict.fromkeys(handle.keys(), file), file)
    return where


def read_tensor(file: Path, key: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
    """Tensor `key` of a safetensors file, as stored, or only its block `index` (one slice per
    leading dimension): only those bytes are read. The file is mapped for this one read, so the
    pages it touched leave this process's memory with it."""
    with _safetensors(file) as handle:
        return handle.get_tensor(key) if index is None else handle.get_slice(key)[index]


def _merge(into: dict, found: dict, file: Path) -> None:
    repeated = sorted(set(into) & set(found))
    if repeated:
        raise CheckpointError(f"{file} holds {repeated[0]} again (another weight file of the folder has it too)")
    into.update(found)


class _safetensors:
    """safe_open with its errors (a damaged header, a truncated file) as CheckpointError."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self):
        try:
            self.context = safe_open(str(self.file), framework="pt")
            return self.context.__enter__()
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{self.file} is not a readable safetensors file ({err})") from None

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


def load_torch_state(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict file, unpickled with weights_only=True: a pickle that needs code to
    rebuild (any global beyond tensors and plain containers) is refused, never run."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"the global {found.group(1)}" if found else "code"
        raise CheckpointError(f"refused to unpickle {file}: it needs {what} to load, which a state dict of tensors "
                              "never does; the file was made to run code (or is not a state dict): do not load "
                              "it, or ask for a safetensors file") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{file} is not a readable PyTorch state dict ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{file} does not hold a state dict (names -> tensors)")
    return state
