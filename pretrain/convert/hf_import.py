"""`proseco convert import`: a Hugging Face folder -> a run folder holding one checkpoint of ours.

The folder may be in the paper's layout (kuleshov-group/proseco-owt, mdlm-owt: config.json's
ProsecoConfig fields, `backbone.*` weights, safetensors or a PyTorch state dict) or in this
framework's (an export). Its keys and shapes are checked against the model its config.json
describes, then the weights are renamed (the fused qkv rows reordered head-major), the vocabulary
padded to model.vocab_multiple, and saved as a DCP checkpoint `OUT/checkpoints/step_00000000`, which loads at
any dp/tp/pp layout. The weights are taken as both the raw and the EMA weights (the releases push
the EMA). The tokenizer: the folder's own (an export), an existing tokenizer folder, or `--kind
gpt2` (the released OWT models': GPT-2 BPE, vocabulary 50258, mask id 50257).

The checkpoint holds no optimizer state or data position: it is for sampling, evaluation, export,
and fine-tuning with `model.init_from=OUT` (a new run), not for `checkpoint.resume`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pretrain.checkpoint import Checkpointer
from pretrain.config import RunConfig, save_config, to_dict
from pretrain.convert.hf_export import TOKENIZER_FOLDER
from pretrain.convert.layouts import resize_vocab
from pretrain.convert.source import open_folder
from pretrain.errors import UserError
from pretrain.models import ModelShape, get_family

IMPORTED_KEY = "imported_from"  # meta.json: where the weights came from (and: no optimizer or data state)
RUN_MARKER = "checkpoints"


@dataclass(frozen=True)
class Imported:
    run_dir: Path
    checkpoint: Path
    run: RunConfig


def import_folder(folder: str | Path, out: str | Path, kind: str | None = None, tokenizer: str | Path | None = None,
                  vocab_multiple: int | None = None, overwrite: bool = False) -> Imported:
    """Import the model folder `folder` into the run folder `out` (see the module's docstring)."""
    from tokenizer.train import atomic_folder, check_output

    folder = Path(folder)
    check_output(Path(out), overwrite, RUN_MARKER)  # before reading what may be gigabytes
    source = open_folder(folder)
    run = _with_vocab_multiple(source.run, vocab_multiple)
    with tempfile.TemporaryDirectory(prefix="proseco-import-") as scratch:
        tokenizer_dir = _tokenizer_folder(folder, kind, tokenizer, Path(scratch), run.model.vocab_size)
        family = get_family(run.model.family)
        weights = resize_vocab(family, source.load(), run.model.vocab_size, ModelShape.of(run.model).vocab_size)
        meta = {"config": to_dict(run), "has_ema": True, "ema_num_updates": 0, "tokens_seen": 0, "world_size": 1,
                IMPORTED_KEY: {"folder": str(folder), "kind": source.kind}}
        with atomic_folder(out, overwrite, RUN_MARKER) as tmp:
            save_config(run, tmp / "config.yaml")
            # The same tensors as raw and EMA weights: DCP writes each key's bytes from them.
            saved = Checkpointer(tmp / RUN_MARKER).save(0, {"model": weights, "ema": weights}, meta,
                                                         {"tokenizer": tokenizer_dir})
    return Imported(Path(out), Path(out) / RUN_MARKER / saved.name, run)


def _with_vocab_multiple(run: RunConfig, vocab_multiple: int | None) -> RunConfig:
    if vocab_multiple is None:
        return run
    if vocab_multiple < 1:
        raise UserError(f"--vocab-multiple {vocab_multiple} must be at least 1")
    return dataclasses.replace(run, model=dataclasses.replace(run.model, vocab_multiple=vocab_multiple))


def _tokenizer_folder(folder: Path, kind: str | None, given: str | Path | None, scratch: Path,
                      vocab_size: int) -> Path:
    """The tokenizer folder to pair the weights with, checked to cover the model's vocabulary."""
    from tokenizer.tokenizers import load_tokenizer
    from tokenizer.train import train_tokenizer

    if kind is not None and given is not None:
        raise UserError("give --kind or --tokenizer, not both")
    if given is not None:
        found = load_tokenizer(given)
    elif kind is not None:
        found = train_tokenizer(None, kind, scratch / "tokenizer") if kind == "gpt2" else None
        if found is None:
            raise UserError(f"--kind {kind}: only gpt2 needs no corpus; for another tokenizer pass --tokenizer DIR")
    elif (folder / TOKENIZER_FOLDER).is_dir():
        found = load_tokenizer(folder / TOKENIZER_FOLDER)
    else:
        raise UserError(f"{folder} carries no tokenizer: pass --kind gpt2 (the released OWT models: GPT-2 BPE "
                        "with the mask at 50257) or --tokenizer DIR")
    if found.vocab_size != vocab_size:
        raise UserError(f"the tokenizer {found.folder} has {found.vocab_size} ids but the model's config.json "
                        f"vocab_size is {vocab_size}; pair it with the tokenizer it was trained with")
    return found.folder
