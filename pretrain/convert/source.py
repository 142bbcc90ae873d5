"""Full weights from wherever they are, under this framework's names, with the config they fit.

    a Hugging Face folder       config.json + weights, in either layout (layouts.py)
    a consolidated file         `proseco checkpoint consolidate`: raw weights and "ema.<name>"
    a checkpoint or run folder  DCP shards saved at any dp/tp/pp layout

`open_source` reads only headers and metadata, and checks a folder's keys and shapes against the
model its config.json describes; `Source.load()` then reads the tensors, `Source.load_into()`
streams them into a rank's shards (a checkpoint by DCP, safetensors one parameter at a time,
stream.py). Nothing is unpickled with code: safetensors, `weights_only=True`, and the
checkpoints' allow-listed reader.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.ranges import field_problems
from pretrain.checkpoint import dcp_load, read_meta, require_verified, resolve_checkpoint
from pretrain.checkpoint.folder import is_deepspeed_checkpoint
from pretrain.checkpoint.inference import load_weights, stored_shapes
from pretrain.config import RunConfig, load_config_dict
from pretrain.convert import hf_folder
from pretrain.convert.layouts import (
    PAPER,
    check_buffers,
    check_shapes,
    expected_shapes,
    from_folder,
    layout_of,
    resize_vocab_rows,
    upgraded_shapes,
)
from pretrain.convert.stream import plan_reads, stream_weights
from pretrain.errors import CheckpointError, ConfigError, UserError
from pretrain.models import ModelShape, get_family
from pretrain.models.init import copy_full_into_local

PUBLISHED_FAMILIES = {"proseco": "dit", "llada": "llada"}  # config.json model_type of a published layout -> its family
EMA_PREFIX = "ema."  # consolidate()'s names for the EMA weights


@dataclass
class Source:
    """Weights at `path`: what they are, the run config they belong to, and how to read them."""

    path: Path
    kind: str
    """What was found, for messages: e.g. "Hugging Face folder (proseco-hf layout)"."""
    run: RunConfig
    """The config the weights belong to (model.vocab_size and model.seq_len resolved)."""
    shapes: dict[str, tuple[int, ...]]
    """Name -> shape of every weight `load` returns, in the model's parameter order."""
    load: Callable[[], dict[str, torch.Tensor]]
    """Read the weights (full tensors on the CPU, float32, this framework's names)."""
    load_into: Callable[[dict[str, torch.Tensor], int], None] | None = None
    """load_into(params, rows): the weights straight into `params` (name -> parameter, whole or
    this rank's DTensor shard), vocabulary parameters re-padded to `rows` rows, without the whole
    model in memory: a checkpoint reads each rank's slices (DCP); safetensors files (a folder in
    either layout, sharded or not, a consolidated file) one parameter at a time, only the shard's
    slice where the parameter is one stored tensor renamed (stream.py). All ranks call it
    together. None where only `load` can read the weights (pytorch_model.bin folders, a family
    without `weight_sources`)."""


def open_source(path: str | Path, ema: bool = True) -> Source:
    """The weights at `path` (a folder with config.json, a .safetensors file, or a checkpoint);
    `ema`: a checkpoint's or consolidated file's EMA weights where it has them."""
    path = Path(path)
    if path.is_dir() and (path / hf_folder.CONFIG).is_file():
        return open_folder(path)
    if path.is_file() and path.suffix == ".safetensors":
        return open_consolidated(path, ema)
    if path.is_file():
        raise UserError(f"{path} is neither a .safetensors file nor a folder; give a checkpoint or run folder, a "
                        "consolidated .safetensors file or a Hugging Face folder")
    return open_checkpoint(path, ema)


def _model_shapes(run: RunConfig) -> dict[str, tuple[int, ...]]:
    family = get_family(run.model.family)
    meta = family.build(run.model, ModelShape.of(run.model), device="meta")
    return {name: tuple(p.shape) for name, p in meta.named_parameters()}


def _run_config(config: dict, where: str) -> RunConfig:
    """A RunConfig from a dict, its problems as one CheckpointError naming `where`."""
    try:
        return load_config_dict(config, drop_unknown=True)
    except UserError as err:
        raise CheckpointError(f"{where} does not describe a model this framework can build: {err}") from None


# -- Hugging Face folders -----------------------------------------------------------------------

def folder_run_config(folder: Path, config: dict) -> RunConfig:
    """The run config of a folder: its own (proseco-pretrain layout), or the defaults with the model
    section its config.json describes (the paper's layout, e.g. dropout 0.1 as proseco-owt)."""
    layout = layout_of(config)
    where = f"{folder / hf_folder.CONFIG}"
    if layout != PAPER:
        if not isinstance(config.get("run_config"), dict):
            raise CheckpointError(f"{where} is in the {layout} layout but has no run_config")
        run = _run_config(config["run_config"], where)
        published = get_family(run.model.family).model_fields(config)
        disagree = [name for name, value in published.items() if getattr(run.model, name) != value]
        if disagree:
            raise CheckpointError(f"{where}: its fields and its run_config disagree on model.{disagree[0]}; "
                                  "the folder was edited by hand: export it again")
        return run
    model_type = config.get("model_type")
    if model_type not in PUBLISHED_FAMILIES:
        raise CheckpointError(f"{where} has model_type={model_type!r}; this framework reads the published layouts "
                              f"{', '.join(PUBLISHED_FAMILIES)} and its own (weights_layout=proseco-pretrain)")
    name = PUBLISHED_FAMILIES[model_type]
    try:
        fields = get_family(name).model_fields(config)
    except UserError as err:
        raise CheckpointError(f"{where}: {err}") from None
    run = _run_config({"name": folder.name, "model": {"family": name, **fields}}, where)
    problems = field_problems(run.model, "model.") + run.model.problems()
    if problems:
        raise CheckpointError(f"{where} describes a model this framework cannot build: {problems[0]}")
    return run


def open_folder(folder: Path) -> Source:
    """A Hugging Face folder in either layout, its keys and shapes checked against its config.json."""
    config = hf_folder.read_config(folder)
    layout = layout_of(config)
    run = folder_run_config(folder, config)
    family = get_family(run.model.family)
    rows = run.model.vocab_size if layout == PAPER else config.get("vocab_rows", ModelShape.of(run.model).vocab_size)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < run.model.vocab_size:
        raise CheckpointError(f"{folder / hf_folder.CONFIG} has vocab_rows={rows!r}; it must be an integer of at "
                              f"least vocab_size={run.model.vocab_size}")
    expected = expected_shapes(family, run.model, layout, rows)
    described = f"the model its config.json describes ({_summary(config)})"
    found = stored = hf_folder.read_shapes(folder)
    if layout != PAPER:  # an export of an earlier version may hold older names (mapped on load)
        found = upgraded_shapes(family, run.model, found)
    check_shapes(found, expected, str(folder), described,
                 optional=frozenset(family.official_buffers(run.model)))

    def load() -> dict[str, torch.Tensor]:
        return from_folder(family, run.model, hf_folder.read_tensors(folder), layout)

    stream = None
    if all(file.suffix == ".safetensors" for file in hf_folder.weight_files(folder)):
        plan = plan_reads(family, run.model, _model_shapes(run), stored,
                          prefix="" if layout == PAPER else family.hf_prefix, official=layout == PAPER)
        if plan is not None:
            stream = _folder_stream(folder, family, run.model, plan, stored)
    return Source(folder, f"Hugging Face folder ({layout} layout)", run, _model_shapes(run), load, stream)


def _folder_stream(folder: Path, family, cfg, plan, stored: dict[str, tuple[int, ...]]):
    """load_into for a folder of safetensors weights: its published buffers checked (they are
    small), then each parameter read as `plan` says."""

    def load_into(params: dict[str, torch.Tensor], rows: int) -> None:
        files = hf_folder.tensor_files(folder)
        buffers = family.official_buffers(cfg)
        check_buffers(buffers, {name: hf_folder.read_tensor(files[name], name) for name in buffers if name in files})
        stream_weights(params, rows, plan, files, stored, family, cfg.vocab_size)

    return load_into


def _summary(config: dict) -> str:
    names = ("vocab_size", "hidden_dim", "n_blocks", "n_heads", "cond_dim", "mlp_ratio")
    return ", ".join(f"{name}={config[name]}" for name in names if name in config)


# -- consolidated files and checkpoints ---------------------------------------------------------

def open_consolidated(file: Path, ema: bool) -> Source:
    """A file written by `proseco checkpoint consolidate` (raw weights, "ema.<name>", the config)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            raw = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err})") from None
    if "config" not in metadata:
        raise CheckpointError(f"{file} has no run config in its metadata: it was not written by `proseco checkpoint "
                              "consolidate`; for a Hugging Face folder pass the folder")
    run = _run_config(json.loads(metadata["config"]), str(file))
    family = get_family(run.model.family)
    stored = upgraded_shapes(family, run.model, raw)  # a file of an earlier version: older names mapped
    prefix = EMA_PREFIX if ema and any(k.startswith(EMA_PREFIX) for k in stored) else ""
    names = {name: prefix + name for name in _model_shapes(run)}
    found = {name: stored[key] for name, key in names.items() if key in stored}
    check_shapes(found, _model_shapes(run), str(file), "the model of its run config")

    def load() -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        tensors = family.upgrade_state(load_file(str(file)), run.model)
        return {name: tensors[key].float() for name, key in names.items()}

    weights = "EMA" if prefix else "raw"
    plan = plan_reads(family, run.model, names, raw, prefix=prefix)  # older names too: their sources
    stream = None if plan is None else _file_stream(file, family, run.model, plan, raw)
    return Source(file, f"consolidated file ({weights} weights)", run, found, load, stream)


def _file_stream(file: Path, family, cfg, plan, stored: dict[str, tuple[int, ...]]):
    """load_into for one safetensors file: each parameter read as `plan` says."""

    def load_into(params: dict[str, torch.Tensor], rows: int) -> None:
        stream_weights(params, rows, plan, dict.fromkeys(stored, file), stored, family, cfg.vocab_size)

    return load_into


def open_checkpoint(path: Path, ema: bool) -> Source:
    """A checkpoint (or the newest of a run folder), saved at any layout; checked before it is read."""
    path = resolve_checkpoint(path)
    if is_deepspeed_checkpoint(path):
        raise UserError(f"{path} is a DeepSpeed engine's checkpoint; convert it for model.init_from first: "
                        f"`proseco checkpoint convert {path} --out NEW_RUN_DIR`, then pass NEW_RUN_DIR")
    meta = read_meta(path)
    run = _run_config(meta.get("config", {}), str(path / "meta.json"))
    key = "ema" if ema and meta.get("has_ema", False) else "model"
    family = get_family(run.model.family)
    stored = upgraded_shapes(family, run.model, stored_shapes(path, key))  # older names mapped
    shapes = _model_shapes(run)
    found = {name: stored[name] for name in shapes if name in stored}
    check_shapes(found, shapes, str(path), "the model of its run config")

    def load() -> dict[str, torch.Tensor]:
        require_verified(path, "digest", collective=False)
        return load_weights(path, key, shapes, lambda state: family.upgrade_state(state, run.model))

    raw = stored_shapes(path, key)

    def load_into(params: dict[str, torch.Tensor], rows: int) -> None:
        """DCP reads each rank's slices straight into its shards when the stored rows are this
        run's; else one whole tensor at a time, re-padded, then sliced."""
        require_verified(path, "digest", collective=False)
        # Decided from the checkpoint alone, so that every rank (also one without a vocabulary
        # parameter, on a pipeline) takes the same, collective or not, path.
        if all(raw[name][0] == rows for name in family.vocab_parameters if name in raw):
            dcp_load({key: params}, path, no_dist=not dist.is_initialized())
            return
        for name, param in params.items():
            whole = {name: torch.empty(raw[name])}
            dcp_load({key: whole}, path, no_dist=True)
            _copy_one(family, run.model.vocab_size, rows, name, whole.pop(name), param)

    stream = load_into if all(name in raw for name in shapes) else None  # older names: load() maps them
    return Source(path, f"checkpoint ({'EMA' if key == 'ema' else 'raw'} weights)", run, found, load, stream)


# -- streaming into sharded parameters -----------------------------------------------------------

def _copy_one(family, vocab_size: int, rows: int, name: str, tensor: torch.Tensor, param: torch.Tensor) -> None:
    """One full weight (any float type) into its parameter's local part, vocabulary rows re-padded."""
    tensor = tensor.to(torch.float32)
    if name in family.vocab_parameters:
        tensor = resize_vocab_rows(tensor, vocab_size, rows)
    copy_full_into_local(param, tensor.to(param.device))


# -- model.init_from ----------------------------------------------------------------------------

def open_init_source(cfg: RunConfig) -> Source:
    """model.init_from's weights, their shapes checked against `cfg`'s model (vocab_size and
    seq_len resolved); a ConfigError naming the field and the first mismatch."""
    model = cfg.model
    try:
        source = open_source(model.init_from, model.init_from_ema)
    except UserError as err:
        raise ConfigError(f"model.init_from={model.init_from}: {err}") from None
    if source.run.model.vocab_size != model.vocab_size:
        raise ConfigError(f"model.init_from={model.init_from}: its vocabulary has {source.run.model.vocab_size} ids, "
                          f"this run's tokenizer {model.vocab_size}; fine-tune on shards made with its tokenizer")
    family = get_family(model.family)
    rows = ModelShape.of(model).vocab_size
    found = {name: (rows, *shape[1:]) if name in family.vocab_parameters else shape
             for name, shape in source.shapes.items()}  # the vocabulary is re-padded to this run's multiple
    expected = {name: tuple(p.shape) for name, p in family.build(model, ModelShape.of(model), device="meta")
                .named_parameters()}
    try:
        check_shapes(found, expected, f"model.init_from={model.init_from} ({source.kind})", "this config's model")
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    return source
