"""Writing conditioning labels for a SMILES shard folder (`proseco label`), for classifier-free
guidance as in the paper's QM9 figure: a binary label per molecule, 1 when its property (QED or
ring count) is above the train split's 90th percentile.

    proseco label data/qm9/shards --property qed

writes ``labels/qed/labels.json`` and ``labels/qed/{train,val}.npy`` into the folder (the layout
is in pretrain/data/labels.py; a URL folder works too). The threshold comes from the train split
alone, so the validation labels do not leak into it. A sample that is unreadable, or not a valid
molecule, gets class 0 and is counted in labels.json.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from pretrain import quality
from pretrain.data.labels import label_files
from pretrain.data.shards import open_shards
from pretrain.errors import UserError
from pretrain.scoring import is_smiles, split_documents
from tokenizer.storage import Store

PROPERTIES = ("qed", "ring_count")
DEFAULT_QUANTILE = 0.9


def label_shards(folder: str | Path, name: str, *, quantile: float = DEFAULT_QUANTILE,
                 overwrite: bool = False) -> dict:
    """Compute and write the label set `name` (a property of PROPERTIES) of every split; returns labels.json."""
    if name not in PROPERTIES:
        raise UserError(f"--property {name!r} is not one of {', '.join(PROPERTIES)}")
    if not 0 < quantile < 1:
        raise UserError(f"--quantile must be in (0, 1), got {quantile}")
    manifest, _ = open_shards(folder)
    if not is_smiles(manifest):
        raise UserError(f"{folder} holds {manifest.content!r} documents, not molecules: labels are molecule "
                        "properties (shard SMILES with `--content smiles`, or a built-in molecule corpus)")
    store = Store(folder)
    info_path, _ = label_files(name, "train")
    if not overwrite and _exists(store, info_path):
        raise UserError(f"{store.url(info_path)} exists; pass --overwrite to compute the labels again")
    values = {split: np.array([quality.property_of(s, name) if s else math.nan
                                for s in split_documents(folder, split, "labeling")])
              for split in manifest.splits}
    train = values["train"][~np.isnan(values["train"])]
    if not len(train):
        raise UserError(f"no valid molecule in the train split of {folder}: nothing to take a threshold from")
    threshold = float(np.quantile(train, quantile))
    info = {"property": name, "quantile": quantile, "threshold": threshold, "num_classes": 2,
            "rule": f"1 when {name} > threshold (the train split's {quantile} quantile), else 0",
            "fingerprint": manifest.fingerprint, "splits": {}}
    for split, split_values in values.items():
        labels = (np.nan_to_num(split_values, nan=-math.inf) > threshold).astype(np.uint8)
        buffer = io.BytesIO()
        np.save(buffer, labels, allow_pickle=False)
        store.write_bytes(label_files(name, split)[1], buffer.getvalue())
        info["splits"][split] = {"samples": len(labels), "positive": int(labels.sum()),
                                 "invalid": int(np.isnan(split_values).sum())}
    # Written last: a set without its description is never mistaken for a finished one.
    store.write_bytes(info_path, json.dumps(info, indent=2).encode())
    return info


def _exists(store: Store, relative: str) -> bool:
    try:
        store.read_bytes(relative)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True
