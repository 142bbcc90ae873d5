"""`proseco convert export`: a checkpoint (saved at any dp/tp/pp layout) -> a Hugging Face folder.

    config.json                  the layout's fields, auto_map to the modeling file
    model.safetensors            or shards + model.safetensors.index.json above --max-shard-size
    modeling_proseco.py          the family's remote code (torch and transformers only)
    tokenizer/                   the run's tokenizer folder (tokenizer.tokenizers.load_tokenizer)

The checkpoint is read whole into this process by `load_model` (checked first, any layout), EMA
weights by default. The folder is written next to its final name and renamed when complete.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pretrain.checkpoint import load_model, read_meta, resolve_checkpoint
from pretrain.convert import hf_folder
from pretrain.convert.layouts import LAYOUTS, PRETRAIN, folder_config, to_folder
from pretrain.errors import UserError
from pretrain.models import get_family

TOKENIZER_FOLDER = "tokenizer"


@dataclass(frozen=True)
class Exported:
    folder: Path
    weights: str
    """"EMA" or "raw": which weights the folder holds."""
    files: list[str]


def export_checkpoint(checkpoint: str | Path, out: str | Path, layout: str = PRETRAIN, use_ema: bool = True,
                      max_shard_bytes: int = hf_folder.DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Exported:
    """Write the checkpoint's weights (EMA unless `use_ema` is off or it has none) to folder `out`."""
    from tokenizer.train import atomic_folder

    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r} is unknown; choose one of {', '.join(LAYOUTS)}")
    path = resolve_checkpoint(checkpoint)
    model, cfg, tokenizer = load_model(path, use_ema=use_ema)
    weights = "EMA" if use_ema and read_meta(path).get("has_ema", False) else "raw"
    family = get_family(cfg.model.family)
    config = folder_config(family, cfg, layout)  # before writing: the paper's layout may refuse the model
    tensors = to_folder(family, cfg.model, {name: p.detach() for name, p in model.named_parameters()}, layout)
    with atomic_folder(out, overwrite, hf_folder.CONFIG) as folder:
        files = hf_folder.write_weights(folder, tensors, max_shard_bytes)
        hf_folder.write_config(folder, {**config, "proseco_export": {"checkpoint": str(path), "weights": weights}})
        modeling = Path(family.hf_modeling_file)
        shutil.copyfile(modeling, folder / modeling.name)
        shutil.copytree(tokenizer.folder, folder / TOKENIZER_FOLDER)
        files += [hf_folder.CONFIG, modeling.name, f"{TOKENIZER_FOLDER}/"]
    return Exported(Path(out), weights, files)
