"""Tokenize a corpus into fixed-length samples and write them as shuffled webdataset shards.

    proseco tokenizer shard --corpus shakespeare --tokenizer data/shakespeare/tokenizer \
        --seq-len 128 --out data/shakespeare/shards

Two layouts (`--packing`):

- pack (default for sentencepiece and gpt2, as MDLM wraps OpenWebText): every document's tokens
  followed by EOS, all concatenated and cut into chunks of seq_len - 2; a sample is
  [BOS] + chunk + [EOS]. The incomplete tail is dropped (stats: dropped_tokens, its EOS included).
- pad (default for char, i.e. SMILES): one document per sample, [BOS] + doc + [EOS] + [PAD]...;
  a document longer than seq_len - 2 keeps its first seq_len - 2 tokens, still followed by EOS
  (stats: truncated documents, dropped_tokens).

Samples are shuffled with a permutation seeded by (seed, split) before they are written, because
the loader reads contiguous ranges of a shard: neighbours in a shard must be unrelated. Key k of
a split is the k-th sample of the shuffled split. Tokenizing and shard writing run on `workers`
processes; the output does not depend on their number. Everything is written in a temporary
folder that becomes `out` only when complete.
"""

from __future__ import annotations

import functools
import multiprocessing
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from pretrain.errors import UserError
from pretrain.files import file_sha256
from tokenizer.corpora import CONTENTS, SPLITS, CorpusError, builtin_content, describe_corpus, iter_documents
from tokenizer.format import (
    MANIFEST,
    Manifest,
    ShardError,
    ShardInfo,
    SplitInfo,
    member_stride,
    read_manifest,
    token_dtype,
    write_manifest,
    write_shard,
)
from tokenizer.tokenizers import CONFIG_FILE, Tokenizer, TokenizerError, compute_sha256, load_tokenizer, read_config
from tokenizer.train import atomic_folder, check_output

PACKINGS = ("pack", "pad")
DEFAULT_SAMPLES_PER_SHARD = 4096
TOKENIZER_COPY = "tokenizer"
BATCH_CHARS = 1 << 20
"""Text per tokenizing task: large enough to amortise inter-process traffic, small enough to balance."""
BATCH_DOCUMENTS = 20_000


class ShardingError(UserError):
    """Sharding cannot proceed as asked; the message says which option to change."""


@dataclass(frozen=True)
class Layout:
    """How documents become samples; everything a worker needs besides the tokenizer."""

    packing: str
    seq_len: int
    dtype: str
    bos_id: int
    eos_id: int
    pad_id: int


def default_packing(tokenizer: Tokenizer) -> str:
    return "pad" if tokenizer.kind == "char" else "pack"


# ---------------------------------------------------------------------------------------------
# Layouts (pure numpy, shared by the workers and the tests)


def join_documents(flat: np.ndarray, lengths: np.ndarray, eos_id: int, dtype: str) -> np.ndarray:
    """The token stream of documents each followed by EOS."""
    stream = np.empty(len(flat) + len(lengths), dtype=dtype)
    eos_positions = np.cumsum(lengths + 1) - 1
    is_token = np.ones(len(stream), dtype=bool)
    is_token[eos_positions] = False
    stream[is_token] = flat
    stream[eos_positions] = eos_id
    return stream


def pack_stream(stream: np.ndarray, layout: Layout) -> np.ndarray:
    """[BOS] + chunk + [EOS] rows from consecutive chunks of seq_len - 2 tokens; the tail is dropped."""
    body = layout.seq_len - 2
    rows = len(stream) // body
    samples = np.empty((rows, layout.seq_len), dtype=layout.dtype)
    samples[:, 0] = layout.bos_id
    samples[:, -1] = layout.eos_id
    samples[:, 1:-1] = stream[: rows * body].reshape(rows, body)
    return samples


def pad_documents(flat: np.ndarray, lengths: np.ndarray, layout: Layout) -> np.ndarray:
    """One row per document: [BOS] + first seq_len - 2 tokens + [EOS] + [PAD]..."""
    count, body = len(lengths), layout.seq_len - 2
    kept = np.minimum(lengths, body)
    samples = np.full((count, layout.seq_len), layout.pad_id, dtype=layout.dtype)
    samples[:, 0] = layout.bos_id
    starts = np.cumsum(lengths) - lengths
    kept_starts = np.cumsum(kept) - kept
    within = np.arange(int(kept.sum())) - np.repeat(kept_starts, kept)  # position inside its document
    rows = np.repeat(np.arange(count), kept)
    samples[rows, 1 + within] = flat[np.repeat(starts, kept) + within]
    samples[np.arange(count), 1 + kept] = layout.eos_id
    return samples


# ---------------------------------------------------------------------------------------------
# Work done in the worker processes


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(folder: str, sha256: str) -> Tokenizer:
    # Keyed by sha256 too, so a folder rewritten in place is loaded again.
    return load_tokenizer(folder)


def _encode_task(task: tuple[str, str, Layout, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a batch of documents: (pad rows or EOS-joined stream, tokens per document)."""
    folder, sha256, layout, texts = task
    flat, lengths = _cached_tokenizer(folder, sha256).encode_array(texts)
    if layout.packing == "pad":
        return pad_documents(flat, lengths, layout), lengths
    return join_documents(flat, lengths, layout.eos_id, layout.dtype), lengths


def _write_task(task: tuple[str, np.ndarray, int]) -> ShardInfo:
    path, samples, first_key = task
    return write_shard(Path(path), samples, first_key)


@contextmanager
def _mapper(workers: int) -> Iterator[Callable]:
    """An order-preserving map over `workers` processes (or in this process when workers == 1)."""
    if workers == 1:
        yield map
        return
    # spawn, not fork: the caller may hold threads (tests, a training process), which fork breaks.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield functools.partial(pool.imap, chunksize=1)


# ---------------------------------------------------------------------------------------------
# Tokenizing and checking a split


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@dataclass
class TokenizedSplit:
    samples: np.ndarray
    """[n, seq_len] in corpus order (not yet shuffled)."""
    lengths: np.ndarray
    """Tokens of each document, before truncation."""
    stats: dict[str, int]


def tokenize_split(mapper: Callable, documents: Iterable[str], tokenizer: Tokenizer, layout: Layout) -> TokenizedSplit:
    """Samples (in corpus order, not yet shuffled) and statistics of one split."""
    tasks = ((str(tokenizer.folder), tokenizer.sha256, layout, batch) for batch in _batches(documents))
    parts, lengths = [], []
    for tokens, doc_lengths in mapper(_encode_task, tasks):
        parts.append(tokens)
        lengths.append(doc_lengths)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    body = layout.seq_len - 2
    stats = {"documents": len(lengths), "tokens": int(lengths.sum())}
    if layout.packing == "pad":
        samples = np.concatenate(parts) if parts else np.zeros((0, layout.seq_len), dtype=layout.dtype)
        stats["truncated"] = int((lengths > body).sum())
        stats["dropped_tokens"] = int(np.maximum(lengths - body, 0).sum())
    else:
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=layout.dtype)
        samples = pack_stream(stream, layout)
        stats["truncated"] = 0
        stats["dropped_tokens"] = len(stream) - samples.shape[0] * body
    stats["samples"] = samples.shape[0]
    return TokenizedSplit(samples, lengths, stats)


def _check_train_split(split: TokenizedSplit, layout: Layout, corpus: str) -> None:
    stats = split.stats
    if stats["documents"] == 0:
        raise CorpusError(f"corpus {corpus!r} has no training documents; check --corpus, --max-chars and --limit")
    if layout.packing == "pad" and stats["truncated"] * 2 > stats["documents"]:
        # Most documents would lose their end: the user almost certainly meant a longer sequence.
        lengths = split.lengths
        fits_all = int(lengths.max()) + 2
        fits_99 = int(np.percentile(lengths, 99, method="higher")) + 2
        raise ShardingError(
            f"--seq-len {layout.seq_len} truncates {stats['truncated']} of {stats['documents']} documents with "
            f"--packing pad; --seq-len {fits_all} fits every document (--seq-len {fits_99} fits 99%)")
    if stats["samples"] == 0:
        raise ShardingError(
            f"corpus {corpus!r} has {stats['tokens']} training tokens, too few for one packed sample of --seq-len "
            f"{layout.seq_len}; lower --seq-len or use a larger corpus")


# ---------------------------------------------------------------------------------------------
# Entry points


def _check_options(seq_len: int, packing: str, samples_per_shard: int, workers: int, content: str) -> None:
    if packing not in PACKINGS:
        raise ShardingError(f"--packing {packing!r} is unknown; choose one of {', '.join(PACKINGS)}")
    if content not in CONTENTS:
        raise ShardingError(f"--content {content!r} is unknown; choose one of {', '.join(CONTENTS)}")
    if seq_len < 3:
        raise ShardingError(f"--seq-len {seq_len} leaves no room between BOS and EOS; use at least 3 (e.g. 128)")
    if samples_per_shard < 1:
        raise ShardingError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if workers < 1:
        raise ShardingError(f"--workers must be at least 1, got {workers}")


def _write_splits(mapper: Callable, folder: Path, splits: dict[str, np.ndarray],
                  samples_per_shard: int) -> dict[str, SplitInfo]:
    tasks, names = [], []
    for split, samples in splits.items():
        for index, start in enumerate(range(0, len(samples), samples_per_shard)):
            relative = f"{split}/shard-{index:06d}.tar"
            tasks.append((str(folder / relative), samples[start: start + samples_per_shard], start))
            names.append((split, relative))
    infos = {split: SplitInfo(samples=len(samples)) for split, samples in splits.items()}
    for (split, relative), info in zip(names, mapper(_write_task, tasks)):
        info.path = relative  # write_shard records the path it was given; the manifest wants it relative
        infos[split].shards.append(info)
    return infos


def shard_corpus(corpus: str, tokenizer: str | Path, seq_len: int, out: str | Path, *, packing: str | None = None,
                 samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, workers: int = 2, seed: int = 0,
                 overwrite: bool = False, text_field: str | None = None, content: str | None = None,
                 **corpus_options: Any) -> Manifest:
    """Tokenize both splits of `corpus` into shuffled shards under `out`; returns the manifest written.

    `content` is what the documents are ("text" or "smiles"), recorded in the manifest; by default
    the content a built-in corpus declares, text for a PATH corpus. `corpus_options` are those of
    `tokenizer.corpora.iter_documents` (max_chars, limit, val_fraction, ...).
    """
    out = Path(out)
    check_output(out, overwrite, MANIFEST)  # before any work
    tok = load_tokenizer(tokenizer)
    packing = packing or default_packing(tok)
    content = content or builtin_content(corpus)
    _check_options(seq_len, packing, samples_per_shard, workers, content)
    dtype = token_dtype(tok.vocab_size)
    layout = Layout(packing, seq_len, dtype, tok.bos_id, tok.eos_id, tok.pad_id)
    with _mapper(workers) as mapper:
        tokenized: dict[str, TokenizedSplit] = {}
        for split in SPLITS:
            documents = iter_documents(corpus, split, text_field, **corpus_options)
            tokenized[split] = tokenize_split(mapper, documents, tok, layout)
            if split == "train":
                _check_train_split(tokenized[split], layout, corpus)
        shuffled = {}
        for index, (split, result) in enumerate(tokenized.items()):
            rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
            shuffled[split] = result.samples[rng.permutation(len(result.samples))]
        with atomic_folder(out, overwrite, MANIFEST) as tmp:
            shutil.copytree(tok.folder, tmp / TOKENIZER_COPY)
            splits = _write_splits(mapper, tmp, shuffled, samples_per_shard)
            stats = {f"{split}_{key}": value
                     for split, result in tokenized.items() for key, value in result.stats.items()}
            manifest = Manifest(seq_len=seq_len, dtype=dtype, packing=packing,
                                corpus=describe_corpus(corpus, text_field, **corpus_options),
                                tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size, splits=splits,
                                stats={**stats, "seed": seed, "samples_per_shard": samples_per_shard},
                                content=content)
            write_manifest(tmp, manifest)
    return manifest


def verify_shards(folder: str | Path) -> list[str]:
    """Problems of a shard folder: missing, resized or altered shards, key gaps, a tokenizer copy that differs."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ShardError as err:
        return [str(err)]
    problems = []
    if manifest.fingerprint != manifest.compute_fingerprint():
        problems.append(f"{MANIFEST}: fingerprint {manifest.fingerprint} does not match its content (edited?)")
    if manifest.dtype != token_dtype(manifest.vocab_size):
        problems.append(f"{MANIFEST}: dtype {manifest.dtype} does not suit vocab_size {manifest.vocab_size}")
    stride = member_stride(manifest.seq_len, manifest.dtype)
    for name, split in manifest.splits.items():
        next_key = 0
        for shard in split.shards:
            path = folder / shard.path
            if shard.first_key != next_key:
                problems.append(f"{shard.path}: first_key {shard.first_key}, expected {next_key}")
            next_key = shard.first_key + shard.samples
            if not path.is_file():
                problems.append(f"{shard.path}: missing")
                continue
            size = path.stat().st_size
            if size != shard.bytes:
                problems.append(f"{shard.path}: {size} bytes, the manifest says {shard.bytes}")
            elif file_sha256(path) != shard.sha256:
                problems.append(f"{shard.path}: sha256 differs from the manifest (the file was altered)")
            elif shard.samples * stride > size:
                problems.append(f"{shard.path}: too small for {shard.samples} samples of {stride} bytes")
        if sum(s.samples for s in split.shards) != split.samples:
            problems.append(f"split {name}: {split.samples} samples in the manifest, its shards hold "
                            f"{sum(s.samples for s in split.shards)}")
    try:
        config = read_config(folder / TOKENIZER_COPY)
        actual = compute_sha256(folder / TOKENIZER_COPY, config)
        if actual != manifest.tokenizer_sha256:
            problems.append(f"{TOKENIZER_COPY}/: sha256 {actual[:16]}... differs from the manifest's "
                            f"{manifest.tokenizer_sha256[:16]}...")
        if config["vocab_size"] != manifest.vocab_size:
            problems.append(f"{TOKENIZER_COPY}/{CONFIG_FILE}: vocab_size {config['vocab_size']}, "
                            f"the manifest says {manifest.vocab_size}")
    except TokenizerError as err:
        problems.append(f"{TOKENIZER_COPY}/: {err}")
    return problems
