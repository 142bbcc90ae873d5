"""Make a tokenizer folder from a corpus: SentencePiece BPE/unigram, characters, or GPT-2's BPE.

    proseco tokenizer train --corpus shakespeare --kind bpe --vocab-size 2048 --out data/shakespeare/tokenizer

Only the train split is read, except by --kind char, whose alphabet covers both splits (an
alphabet learns nothing from the text, and a character seen only in val would make sharding that
corpus fail). The folder is built under a temporary name next to `--out` and renamed when
complete, so `--out` either holds a whole tokenizer or nothing.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from pretrain.errors import UserError
from tokenizer.corpora import CorpusError, data_install_hint, describe_corpus, find_data_package, iter_documents
from tokenizer.tokenizers import (
    CONFIG_FILE,
    GPT2_RANKS_FILE,
    MASK_TEXT,
    SPM_MODEL_FILE,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    write_config,
)

KINDS = ("bpe", "unigram", "char", "gpt2")

# SentencePiece reserved ids; unk is required by SentencePiece (byte fallback never emits it).
SPM_SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
SPM_MAX_CHUNK_CHARS = 4096
"""SentencePiece learns from "sentences"; documents are cut at line ends into chunks this long."""
SPM_MAX_SENTENCES = 2_000_000
"""Above this many chunks SentencePiece trains on a (seeded) random sample of them."""

CHAR_SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "mask_id": 3}

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
"""sha256 of tiktoken's r50k_base ranks, which openai-whisper ships as whisper/assets/gpt2.tiktoken."""
GPT2_ENDOFTEXT_ID = 50256
GPT2_VOCAB_SIZE = 50258  # 50257 GPT-2 ids + the mask


class OutputExistsError(UserError):
    """The output folder exists and --overwrite was not given (or it is not ours to replace)."""


# ---------------------------------------------------------------------------------------------
# Atomic output folders (shared with tokenizer.shard)


def check_output(out: Path, overwrite: bool, marker: str) -> None:
    """Refuse an existing `out` unless --overwrite, and even then only a folder holding `marker` (or empty)."""
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists()):
        # --overwrite deletes the old folder: never do that to something this tool did not write.
        raise OutputExistsError(f"{out} exists and does not look like an output of this tool (no {marker}); "
                                "remove it yourself or choose another --out")


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool, marker: str) -> Iterator[Path]:
    """A temporary folder next to `out` that replaces `out` if the block succeeds and is deleted if not."""
    out = Path(out)
    check_output(out, overwrite, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        yield tmp
        check_output(out, overwrite, marker)  # something may have appeared meanwhile
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# SentencePiece


def _sentencepiece_chunks(documents: Iterable[str], max_chars: int = SPM_MAX_CHUNK_CHARS) -> Iterator[str]:
    """Cut documents at line ends into chunks of at most `max_chars`, newlines kept so they are learned."""
    for document in documents:
        chunk = ""
        for line in document.splitlines(keepends=True):
            if len(chunk) + len(line) > max_chars and chunk:
                yield chunk
                chunk = ""
            while len(line) > max_chars:  # a very long line: cut it hard
                yield line[:max_chars]
                line = line[max_chars:]
            chunk += line
        if chunk:
            yield chunk


def _explain_sentencepiece_error(err: RuntimeError, vocab_size: int) -> str:
    message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (f"--vocab-size {vocab_size} is more than this corpus supports; SentencePiece can make at most "
                f"{too_high.group(2)} pieces: lower --vocab-size or use a larger corpus")
    if "smaller than required_chars" in message or "Vocabulary size is smaller" in message:
        return (f"--vocab-size {vocab_size} is too small for the corpus' characters plus 256 byte pieces and "
                f"5 specials; raise --vocab-size")
    return f"SentencePiece training failed: {message}"


def train_sentencepiece(documents: Iterable[str], model_type: str, vocab_size: int, folder: Path,
                        threads: int = 2, sample_sentences: int = SPM_MAX_SENTENCES,
                        max_train_chars: int | None = None) -> dict[str, Any]:
    """Train a lossless SentencePiece model into `folder`; returns the tokenizer.json content (no sha256).

    The training sample is bounded twice: SentencePiece keeps a seeded random sample of at most
    `sample_sentences` chunks of up to SPM_MAX_CHUNK_CHARS characters (memory), and reading stops
    after the first `max_train_chars` characters of the corpus (time; None reads it all).
    """
    if sample_sentences <= 100:  # SentencePiece's own lower bound
        raise TokenizerError(f"--sample-sentences must be above 100, got {sample_sentences}")
    if max_train_chars is not None and max_train_chars < 1:
        raise TokenizerError(f"--max-train-chars must be positive, got {max_train_chars}")
    import sentencepiece as spm

    if vocab_size < 262:
        raise TokenizerError(f"--vocab-size {vocab_size} is too small for --kind {model_type}: 256 byte pieces "
                             "and 5 specials come first; use at least a few hundred (2048 for Shakespeare)")
    stats = {"documents": 0, "characters": 0}
    errors: list[BaseException] = []

    def sentences() -> Iterator[str]:
        # SentencePiece consumes this from C++ and would swallow a corpus error: keep it for re-raising.
        try:
            for document in documents:
                if max_train_chars is not None and stats["characters"] >= max_train_chars:
                    break
                stats["documents"] += 1
                stats["characters"] += len(document)
                yield from _sentencepiece_chunks([document])
        except Exception as err:  # noqa: BLE001 - re-raised below, after the trainer returns
            errors.append(err)

    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # the sentence sample of a large corpus is drawn with it
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, model_type=model_type, vocab_size=vocab_size,
            # Lossless: no normalisation, every whitespace kept, unseen characters as UTF-8 bytes.
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, byte_fallback=True, character_coverage=1.0,
            split_digits=True, max_sentence_length=4 * SPM_MAX_CHUNK_CHARS + 16,
            input_sentence_size=sample_sentences, shuffle_input_sentence=True,
            control_symbols=[MASK_TEXT], num_threads=threads, minloglevel=2, **SPM_SPECIAL_IDS)
    except RuntimeError as err:
        if errors:
            raise errors[0] from err
        if stats["documents"] == 0:
            raise CorpusError("the corpus has no training documents; "
                              "check --corpus (and --max-chars/--limit)") from None
        raise TokenizerError(_explain_sentencepiece_error(err, vocab_size)) from None
    if errors:
        raise errors[0]
    (folder / SPM_MODEL_FILE).write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return {"kind": "sentencepiece", "model_type": model_type, "vocab_size": processor.get_piece_size(),
            "mask_id": processor.piece_to_id(MASK_TEXT), **SPM_SPECIAL_IDS, "info": {"trained_on": stats}}


# ---------------------------------------------------------------------------------------------
# Characters and GPT-2


def make_char_config(documents: Iterable[str], vocab_size: int | None = None) -> dict[str, Any]:
    """A char tokenizer's config: the specials, then every character of the documents in code point order."""
    characters: set[str] = set()
    stats = {"documents": 0, "characters": 0}
    for document in documents:
        characters.update(document)
        stats["documents"] += 1
        stats["characters"] += len(document)
    if not characters:
        raise CorpusError("the corpus has no training characters; check --corpus (and --max-chars/--limit)")
    needed = len(CHAR_SPECIAL_IDS) + len(characters)
    if vocab_size is not None and vocab_size < needed:
        raise TokenizerError(f"the corpus has {len(characters)} distinct characters, which with "
                             f"{len(CHAR_SPECIAL_IDS)} specials need --vocab-size {needed} (got {vocab_size}); "
                             "raise it or omit it for --kind char")
    return {"kind": "char", "vocab_size": needed, **CHAR_SPECIAL_IDS, "first_char_id": len(CHAR_SPECIAL_IDS),
            "alphabet": "".join(sorted(characters)), "info": {"trained_on": stats}}


def gpt2_ranks_file() -> Path:
    """whisper/assets/gpt2.tiktoken, found without importing whisper (which imports torch and more),
    where the data-carrier packages are installed (`tokenizer.corpora.find_data_package`)."""
    package = find_data_package("whisper")
    path = package / "assets" / GPT2_RANKS_FILE if package else None
    if path is None or not path.is_file():
        raise TokenizerError("--kind gpt2 needs the GPT-2 ranks shipped by openai-whisper: "
                             f"{data_install_hint('openai-whisper==20250625')}")
    return path


def make_gpt2_folder(folder: Path, vocab_size: int | None = None) -> dict[str, Any]:
    """Copy GPT-2's r50k ranks into `folder`; returns its config (mask 50257, EOS = BOS = PAD = 50256)."""
    try:
        from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    except ImportError:
        raise TokenizerError("--kind gpt2 needs tiktoken: pip install 'tiktoken>=0.7' (the [gpt2] extra)") from None
    if vocab_size is not None and vocab_size != GPT2_VOCAB_SIZE:
        raise TokenizerError(f"--kind gpt2 has a fixed vocabulary of {GPT2_VOCAB_SIZE} (50257 GPT-2 ids + mask); "
                             f"omit --vocab-size or pass {GPT2_VOCAB_SIZE}")
    source = gpt2_ranks_file()
    data = source.read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise TokenizerError(f"{source} is not GPT-2's r50k vocabulary (sha256 differs); "
                             f"reinstall: {data_install_hint('openai-whisper==20250625')}")
    (folder / GPT2_RANKS_FILE).write_bytes(data)
    return {"kind": "gpt2", "encoding_name": "r50k_base", "pattern": r50k_pat_str, "endoftext": ENDOFTEXT,
            "vocab_size": GPT2_VOCAB_SIZE, "mask_id": GPT2_ENDOFTEXT_ID + 1, "bos_id": GPT2_ENDOFTEXT_ID,
            "eos_id": GPT2_ENDOFTEXT_ID,
            # GPT-2 has no pad token; 50257 is the mask, so padding reuses <|endoftext|>.
            "pad_id": GPT2_ENDOFTEXT_ID, "info": {"source": "r50k_base from openai-whisper"}}


# ---------------------------------------------------------------------------------------------
# Entry point


def train_tokenizer(corpus: str | None, kind: str, out: str | Path, vocab_size: int | None = None, *,
                    text_field: str | None = None, overwrite: bool = False, threads: int = 2,
                    sample_sentences: int = SPM_MAX_SENTENCES, max_train_chars: int | None = None,
                    **corpus_options: Any) -> Tokenizer:
    """Make a tokenizer of `kind` from `corpus` (its train split; char: both) in folder `out`, and load it.

    vocab_size is required for bpe/unigram; for char it is an upper bound (the alphabet decides);
    gpt2's is fixed and needs no corpus. `sample_sentences` and `max_train_chars` bound what
    SentencePiece learns from (see `train_sentencepiece`). `corpus_options` are those of
    `tokenizer.corpora.iter_documents`.
    """
    if kind not in KINDS:
        raise TokenizerError(f"--kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if kind in ("bpe", "unigram") and vocab_size is None:
        raise TokenizerError(f"--kind {kind} needs --vocab-size (e.g. 2048 for Shakespeare)")
    if kind != "gpt2" and corpus is None:
        raise TokenizerError(f"--kind {kind} is trained on a corpus: pass --corpus NAME|PATH")
    out = Path(out)
    with atomic_folder(out, overwrite, CONFIG_FILE) as folder:  # checks `out` before any training
        if kind == "gpt2":
            config = make_gpt2_folder(folder, vocab_size)
        else:
            documents = iter_documents(corpus, "train", text_field, **corpus_options)
            if kind == "char":
                val = iter_documents(corpus, "val", text_field, **corpus_options)
                config = make_char_config(itertools.chain(documents, val), vocab_size)
            else:
                config = train_sentencepiece(documents, kind, vocab_size, folder, threads, sample_sentences,
                                             max_train_chars)
            config["info"]["corpus"] = describe_corpus(corpus, text_field, **corpus_options)
        write_config(folder, config)
        load_tokenizer(folder)  # a folder that does not load must not become `out`
    return load_tokenizer(out)
