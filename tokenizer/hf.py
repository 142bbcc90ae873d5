"""Import a Hugging Face tokenizer (e.g. LLaDA-8B's) as a tokenizer folder of kind "hf".

    proseco tokenizer import-hf SRC --out DIR [--mask-token TOKEN]

SRC is a folder holding tokenizer.json (and tokenizer_config.json), a Hugging Face hub cache entry
(``models--ORG--NAME``, whose ``refs/main`` snapshot is used), or ``ORG/NAME`` when that model is in
the local hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub). Nothing is
downloaded. The folder written::

    DIR/tokenizer.json             the project's config: kind "hf", vocab_size, special ids and
                                   their texts, sha256 (over it and both HF files), info
    DIR/hf/tokenizer.json          the source's, byte for byte
    DIR/hf/tokenizer_config.json   the source's, byte for byte; when the source keeps its chat
                                   template in chat_template.jinja, or has no tokenizer_config.json,
                                   one written with what special_tokens_map.json and that file hold

Special ids come from tokenizer_config.json (bos_token, eos_token, pad_token, mask_token, falling
back on special_tokens_map.json): EOS must exist; without a BOS the EOS stands in (as for GPT-2),
without a PAD the EOS (as LLaDA's config says). The mask token is --mask-token, else the config's
mask_token, else LLaDA's ``<|mdm_mask|>`` (id 126336 there, which its config does not name) when the
vocabulary has it; otherwise the import fails and says to pass --mask-token. vocab_size is the
largest id plus one: a model may have more embedding rows (LLaDA-8B has 126,464 for 126,349 ids).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tokenizer.tokenizers import (
    CONFIG_FILE,
    HF_CONFIG_FILE,
    HF_DIR,
    HF_TOKENIZER_FILE,
    Tokenizer,
    TokenizerError,
    chat_template_of,
    compile_chat_template,
    import_tokenizers_library,
    load_tokenizer,
    token_text,
    write_config,
)
from tokenizer.train import atomic_folder

LLADA_MASK_TOKEN = "<|mdm_mask|>"
"""LLaDA's mask token: in its vocabulary, not named by its tokenizer_config.json."""
SOURCE_TOKENIZER = "tokenizer.json"
SOURCE_CONFIG = "tokenizer_config.json"
SOURCE_SPECIAL_MAP = "special_tokens_map.json"
SOURCE_TEMPLATE = "chat_template.jinja"
ROLES = ("bos", "eos", "pad", "mask")


def hub_cache() -> Path:
    """The local Hugging Face hub cache, where huggingface_hub would look."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ["HF_HOME"]).expanduser() if os.environ.get("HF_HOME") else Path.home() / ".cache/huggingface"
    return home / "hub"


def _snapshot(entry: Path) -> Path:
    """The snapshot folder of a hub cache entry: the one refs/main names, else the only one."""
    ref = entry / "refs" / "main"
    if ref.is_file():
        return entry / "snapshots" / ref.read_text().strip()
    snapshots = sorted(p for p in (entry / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) != 1:
        raise TokenizerError(f"{entry} holds {len(snapshots)} snapshots and no refs/main; pass the snapshot "
                             f"folder itself ({entry}/snapshots/HASH)")
    return snapshots[0]


def resolve_source(source: str | Path) -> Path:
    """The folder holding the source's tokenizer.json (see the module docstring for what SRC may be)."""
    path = Path(source).expanduser()
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        organisation, name = str(source).split("/")
        path = hub_cache() / f"models--{organisation}--{name}"
    if path.is_dir() and not (path / SOURCE_TOKENIZER).is_file() and (path / "snapshots").is_dir():
        path = _snapshot(path)
    if not (path / SOURCE_TOKENIZER).is_file():
        raise TokenizerError(f"{source} is not a Hugging Face tokenizer folder (no {SOURCE_TOKENIZER} in {path}); "
                             "pass a folder holding tokenizer.json and tokenizer_config.json, a hub cache entry "
                             "(models--ORG--NAME), or ORG/NAME of a model in the local hub cache (e.g. after "
                             "`huggingface-cli download GSAI-ML/LLaDA-8B-Instruct`)")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return value


def source_config(folder: Path) -> tuple[dict[str, Any], bytes | None, list[str]]:
    """The tokenizer_config.json to use, its bytes when the source's can be kept as they are (None
    when one must be written), and what was merged into it (for the folder's info)."""
    path = folder / SOURCE_CONFIG
    config = _read_json(path) if path.is_file() else {}
    merged: list[str] = []
    if (folder / SOURCE_SPECIAL_MAP).is_file():
        for key, value in _read_json(folder / SOURCE_SPECIAL_MAP).items():
            if key not in config:
                config[key] = value
                merged.append(f"{key} from {SOURCE_SPECIAL_MAP}")
    if chat_template_of(config) is None and (folder / SOURCE_TEMPLATE).is_file():
        config["chat_template"] = (folder / SOURCE_TEMPLATE).read_text(encoding="utf-8")
        merged.append(f"chat_template from {SOURCE_TEMPLATE}")
    kept = path.read_bytes() if path.is_file() and not merged else None
    return config, kept, merged


def special_ids(backend, hf_config: dict[str, Any], mask_token: str | None,
                where: Path) -> tuple[dict[str, str], dict[str, int], dict[str, str]]:
    """Text, id and origin of BOS, EOS, PAD and the mask."""
    texts: dict[str, str] = {}
    origins: dict[str, str] = {}
    for role in ("bos", "eos", "pad"):
        text = token_text(hf_config.get(f"{role}_token"))
        if text is not None:
            texts[role], origins[role] = text, f"{role}_token"
    if "eos" not in texts:
        raise TokenizerError(f"{where}: tokenizer_config.json names no eos_token; a tokenizer needs one (add "
                             "\"eos_token\" to the source's tokenizer_config.json)")
    for role in ("bos", "pad"):
        if role not in texts:
            texts[role], origins[role] = texts["eos"], "eos_token (the config names none)"
    config_mask = token_text(hf_config.get("mask_token"))
    if mask_token is not None:
        texts["mask"], origins["mask"] = mask_token, "--mask-token"
    elif config_mask is not None:
        texts["mask"], origins["mask"] = config_mask, "mask_token"
    elif backend.token_to_id(LLADA_MASK_TOKEN) is not None:
        texts["mask"], origins["mask"] = LLADA_MASK_TOKEN, "LLaDA's mask token, in the vocabulary"
    else:
        raise TokenizerError(f"{where}: no mask token: tokenizer_config.json names no mask_token and the "
                             f"vocabulary has no {LLADA_MASK_TOKEN}; pass --mask-token TOKEN naming a token of "
                             "the vocabulary that the model uses as its mask (a masked diffusion model needs one)")
    ids: dict[str, int] = {}
    for role in ROLES:
        token_id = backend.token_to_id(texts[role])
        if token_id is None:
            raise TokenizerError(f"{where}: the {role} token {texts[role]!r} ({origins[role]}) is not in the "
                                 "vocabulary of tokenizer.json; name one that is" +
                                 (" with --mask-token" if role == "mask" else ""))
        ids[role] = token_id
    if ids["mask"] in (ids["bos"], ids["eos"], ids["pad"]):
        raise TokenizerError(f"{where}: the mask token {texts['mask']!r} is also BOS, EOS or PAD; the mask must be "
                             "a token of its own: pass another --mask-token")
    return texts, ids, origins


def import_hf_tokenizer(source: str | Path, out: str | Path, *, mask_token: str | None = None,
                        overwrite: bool = False) -> Tokenizer:
    """Write a tokenizer folder of kind "hf" at `out` from a Hugging Face tokenizer; returns it, loaded."""
    folder = resolve_source(source)
    tokenizers = import_tokenizers_library(folder)
    try:
        backend = tokenizers.Tokenizer.from_file(str(folder / SOURCE_TOKENIZER))
    except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exception
        raise TokenizerError(f"{folder / SOURCE_TOKENIZER} is not a tokenizers file ({err})") from None
    hf_config, kept, merged = source_config(folder)
    texts, ids, origins = special_ids(backend, hf_config, mask_token, folder)
    template = chat_template_of(hf_config)
    if template is not None:
        compile_chat_template(template, folder / SOURCE_CONFIG)  # a broken template fails now, not when sharding
    config = {"kind": "hf", "vocab_size": max(backend.get_vocab(with_added_tokens=True).values()) + 1,
              **{f"{role}_id": ids[role] for role in ROLES}, "special_tokens": texts,
              "info": {"source": str(folder.resolve()), "special_tokens_from": origins,
                       "chat_template": "none" if template is None else "tokenizer_config.json",
                       "merged_into_tokenizer_config": merged}}
    with atomic_folder(Path(out), overwrite, CONFIG_FILE) as tmp:
        (tmp / HF_DIR).mkdir()
        (tmp / HF_TOKENIZER_FILE).write_bytes((folder / SOURCE_TOKENIZER).read_bytes())
        config_bytes = kept if kept is not None else (json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n"
                                                      ).encode("utf-8")
        (tmp / HF_CONFIG_FILE).write_bytes(config_bytes)
        write_config(tmp, config)
        load_tokenizer(tmp)  # a folder that does not load must not become `out`
    return load_tokenizer(out)
