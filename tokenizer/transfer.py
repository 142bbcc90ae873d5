"""Moving shard folders between local disks and URLs: the tokenizer copy a remote folder carries
is fetched into a local cache (SentencePiece loads from files), and a local folder is uploaded."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from tokenizer.storage import Store
from tokenizer.tokenizers import CONFIG_FILE, MODEL_FILES

TOKENIZER_COPY = "tokenizer"


def cache_root() -> Path:
    """Where downloaded tokenizers are kept: $PROSECO_CACHE, else ~/.cache/proseco."""
    return Path(os.environ.get("PROSECO_CACHE") or Path.home() / ".cache" / "proseco")


def local_tokenizer(store: Store, sha256: str) -> Path:
    """A local copy of the tokenizer folder of a remote shard folder, cached by its sha256 (the
    manifest's): every process of every run on this machine reuses one download."""
    target = cache_root() / "tokenizers" / sha256
    if (target / CONFIG_FILE).is_file():
        return target
    config_bytes = store.read_bytes(f"{TOKENIZER_COPY}/{CONFIG_FILE}")
    kind = json.loads(config_bytes)["kind"]
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir(parents=True)
    try:
        for name in MODEL_FILES.get(kind, ()):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # the hf kind keeps its files in hf/
            (tmp / name).write_bytes(store.read_bytes(f"{TOKENIZER_COPY}/{name}"))
        (tmp / CONFIG_FILE).write_bytes(config_bytes)  # last: a folder with a config is complete
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first (target exists and is not empty)
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
