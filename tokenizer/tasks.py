"""Sharding a corpus of any size as N independent tasks and one merge.

The documents of a split are cut into **chunks** of about `chunk_chars` characters (a chunk ends
after the document that crosses the limit), which depends on the corpus alone. Chunk c of a split
belongs to task c % N. A task tokenizes each of its chunks on all its worker processes, lays the
tokens out as samples (pack or pad), shuffles them with a permutation seeded by (seed, split, c),
writes them as shards of `samples_per_shard` (``{split}/shard-{c:06d}-{part:04d}.tar``, keys
c * KEY_SPAN + i) and then a record of the chunk (``.tasks/{split}-{c:06d}.json``). A killed task
run again skips every chunk whose record exists. The merge reads the records and writes
manifest.json (the folder is a shard folder from then on) after checking that every chunk is there.

Memory is bounded whatever the corpus size: one chunk being read, one being tokenized, and
`workers` batches of BATCH_CHARS in flight. The output depends on neither N nor the number of
workers: N tasks + merge write the same bytes as one task + merge.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from pretrain.errors import UserError
from tokenizer.corpora import SPLITS, CorpusError, iter_documents
from tokenizer.format import Geometry, Manifest, ShardInfo, SplitInfo, shard_bytes, write_manifest
from tokenizer.storage import Store
from tokenizer.tokenizers import CONFIG_FILE, MODEL_FILES, Tokenizer, load_tokenizer
from tokenizer.transfer import TOKENIZER_COPY

TASKS = ".tasks"
"""Where tasks leave their records, inside the output folder."""
KEY_SPAN = 10 ** 7
"""Keys of chunk c are c * KEY_SPAN + [0, samples of c): unique in a split without knowing the
sizes of the chunks before (12-digit keys: up to 10^5 chunks of up to 10^7 samples)."""
DEFAULT_CHUNK_CHARS = 64 << 20
BATCH_CHARS = 1 << 20
"""Text per tokenizing call of a worker: large enough to amortise inter-process traffic."""
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


@dataclass(frozen=True)
class ShardJob:
    """Everything that determines the bytes of a sharded folder; tasks of one job must agree on it."""

    corpus: str
    corpus_options: dict
    """Keyword arguments of `tokenizer.corpora.iter_documents` (text_field, limit, ...)."""
    corpus_description: str
    tokenizer_sha256: str
    vocab_size: int
    content: str
    layout: Layout
    geometry: Geometry
    format: str
    seed: int
    samples_per_shard: int
    chunk_chars: int

    def settings(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, as they come back from JSON


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
# Worker processes


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


class _Pool:
    """`workers` processes (none for one worker) taking calls whose results come back in order."""

    def __init__(self, workers: int):
        # spawn, not fork: the caller may hold threads (tests, a training process), which fork breaks.
        self.pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None

    def submit(self, function: Callable, argument: Any) -> Callable[[], Any]:
        """Start a call; returns what gives its result (raising the worker's error)."""
        if self.pool is None:
            return functools.partial(function, argument)
        return self.pool.apply_async(function, (argument,)).get

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


@contextmanager
def _pool(workers: int) -> Iterator[_Pool]:
    pool = _Pool(workers)
    try:
        yield pool
    finally:
        pool.close()


# ---------------------------------------------------------------------------------------------
# Chunks


def chunks(documents: Iterable[str], chunk_chars: int, wanted: Callable[[int], bool]) -> Iterator[tuple[int, list]]:
    """(index, documents) of each chunk; the documents of chunks not `wanted` are not kept (an empty
    list stands for them), so a task reads past other tasks' chunks in constant memory."""
    index, chars, kept = 0, 0, []
    keep = wanted(0)
    for text in documents:
        if keep:
            kept.append(text)
        chars += len(text)
        if chars >= chunk_chars:
            yield index, kept
            index, chars, kept = index + 1, 0, []
            keep = wanted(index)
    if chars or index == 0:  # the last, partial chunk (and an empty split's one chunk)
        yield index, kept


def _batches(documents: list[str]) -> Iterator[list[str]]:
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


def _samples(parts: list[np.ndarray], lengths: np.ndarray, layout: Layout) -> tuple[np.ndarray, dict[str, int]]:
    """A chunk's samples in corpus order and its statistics."""
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
    # For the merge's advice on --seq-len when padding truncates most documents.
    stats["longest"] = int(lengths.max()) if len(lengths) else 0
    stats["longest_99"] = int(np.percentile(lengths, 99, method="higher")) if len(lengths) else 0
    return samples, stats


def record_name(split: str, chunk: int) -> str:
    return f"{TASKS}/{split}-{chunk:06d}.json"


def _finish_chunk(store: Store, job: ShardJob, split_index: int, split: str, chunk: int,
                  parts: list[np.ndarray], lengths: list[np.ndarray]) -> None:
    """Shuffle a tokenized chunk, write its shards, then its record (the proof it is complete).
    Partial files of this chunk that a killed run of this task left are removed first (the chunk
    belongs to this task alone, so no live writer holds them)."""
    store.remove_partials(f"{split}/shard-{chunk:06d}-")
    store.remove_partials(record_name(split, chunk))
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    samples, stats = _samples(parts, lengths_all, job.layout)
    if len(samples) > KEY_SPAN:
        raise ShardingError(f"chunk {chunk} of {split} holds {len(samples)} samples, more than keys allow "
                            f"({KEY_SPAN}); lower --chunk-mib")
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, split_index, chunk]))
    samples = samples[rng.permutation(len(samples))]
    infos = []
    for part, start in enumerate(range(0, len(samples), job.samples_per_shard)):
        relative = f"{split}/shard-{chunk:06d}-{part:04d}.tar"
        rows = samples[start: start + job.samples_per_shard]
        first_key = chunk * KEY_SPAN + start
        body = shard_bytes(rows, first_key, job.geometry)
        store.write_bytes(relative, body)
        infos.append(asdict(ShardInfo(path=relative, samples=len(rows), first_key=first_key, bytes=len(body),
                                      sha256=hashlib.sha256(body).hexdigest())))
    store.write_bytes(record_name(split, chunk), json.dumps({"shards": infos, "stats": stats}).encode())


def _done(store: Store, split: str, chunk: int) -> bool:
    try:
        store.read_bytes(record_name(split, chunk))
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Tasks and merge


def _claim(store: Store, job: ShardJob) -> None:
    """Record the job's settings in the folder, or check that they are the ones already recorded:
    tasks of one folder must write the same job (a resumed task too)."""
    settings = job.settings()
    name = f"{TASKS}/settings.json"
    try:
        recorded = json.loads(store.read_bytes(name))
    except (FileNotFoundError, NotADirectoryError):
        store.write_bytes(name, json.dumps(settings, indent=2, sort_keys=True).encode())
        return
    if recorded != settings:
        changed = sorted(key for key in settings if settings[key] != recorded.get(key))
        raise ShardingError(f"{store.url(name)} records another sharding job (different {', '.join(changed)}); "
                            "use the same options for every task, or another --out")


def _copy_tokenizer(store: Store, tokenizer: Tokenizer) -> None:
    for name in (*MODEL_FILES[tokenizer.kind], CONFIG_FILE):
        store.write_bytes(f"{TOKENIZER_COPY}/{name}", (tokenizer.folder / name).read_bytes())


def run_task(job: ShardJob, tokenizer: Tokenizer, store: Store, task_index: int = 0, num_tasks: int = 1,
             workers: int = 1) -> dict[str, int]:
    """Write the chunks of task `task_index` of `num_tasks` into `store` (finished chunks are
    skipped); returns how many chunks this call wrote and skipped."""
    if not 0 <= task_index < num_tasks:
        raise ShardingError(f"--task-index {task_index} is not in [0, --num-tasks {num_tasks})")
    _claim(store, job)
    if task_index == 0:
        _copy_tokenizer(store, tokenizer)
    counts = {"written": 0, "skipped": 0}
    with _pool(workers) as pool:
        for split_index, split in enumerate(SPLITS):
            documents = iter_documents(job.corpus, split, **job.corpus_options)

            def mine(chunk: int) -> bool:
                return chunk % num_tasks == task_index

            pending: deque = deque()  # one chunk tokenizing while the next is read
            total = 0
            for chunk, texts in chunks(documents, job.chunk_chars, mine):
                total = chunk + 1
                if not mine(chunk):
                    continue
                if _done(store, split, chunk):
                    counts["skipped"] += 1
                    continue
                tasks = [(str(tokenizer.folder), tokenizer.sha256, job.layout, batch) for batch in _batches(texts)]
                pending.append((chunk, [pool.submit(_encode_task, task) for task in tasks]))
                if len(pending) > 1:
                    _collect(store, job, split_index, split, *pending.popleft())
                    counts["written"] += 1
            while pending:
                _collect(store, job, split_index, split, *pending.popleft())
                counts["written"] += 1
            store.write_bytes(f"{TASKS}/{split}-chunks.json", json.dumps({"chunks": total}).encode())
    return counts


def _collect(store: Store, job: ShardJob, split_index: int, split: str, chunk: int, results: list) -> None:
    parts, lengths = [], []
    for result in results:
        tokens, doc_lengths = result()
        parts.append(tokens)
        lengths.append(doc_lengths)
    _finish_chunk(store, job, split_index, split, chunk, parts, lengths)


def merge(store: Store) -> Manifest:
    """Write manifest.json from the chunk records of every task; refuses while a chunk is missing."""
    try:
        settings = json.loads(store.read_bytes(f"{TASKS}/settings.json"))
    except (FileNotFoundError, NotADirectoryError):
        raise ShardingError(f"{store.root} holds no sharding tasks ({TASKS}/settings.json); run "
                            "`proseco tokenizer shard ... --task-index I --num-tasks N` first") from None
    splits, stats = {}, {}
    for split in SPLITS:
        try:
            total = json.loads(store.read_bytes(f"{TASKS}/{split}-chunks.json"))["chunks"]
        except (FileNotFoundError, NotADirectoryError):
            raise ShardingError(f"{store.root}: no task has read the whole {split} split yet; wait for every "
                                "task to finish, then merge") from None
        missing = [c for c in range(total) if not _done(store, split, c)]
        if missing:
            raise ShardingError(f"{store.root}: {len(missing)} of {total} {split} chunks are not written yet "
                                f"(chunk {missing[0]} first); run or re-run the tasks that own them "
                                "(chunk c belongs to task c % N), then merge")
        info, split_stats = SplitInfo(), {}
        for chunk in range(total):
            record = json.loads(store.read_bytes(record_name(split, chunk)))
            info.shards += [ShardInfo(**shard) for shard in record["shards"]]
            for key, value in record["stats"].items():
                merged = max if key.startswith("longest") else sum
                split_stats[key] = merged((split_stats.get(key, 0), value))
        info.samples = sum(s.samples for s in info.shards)
        splits[split] = info
        stats.update({f"{split}_{key}": value for key, value in split_stats.items()
                      if not key.startswith("longest")})
        if split == "train":
            _check_train_split(split_stats, settings)
    layout = settings["layout"]
    manifest = Manifest(seq_len=layout["seq_len"], dtype=layout["dtype"], packing=layout["packing"],
                        corpus=settings["corpus_description"], tokenizer_sha256=settings["tokenizer_sha256"],
                        vocab_size=settings["vocab_size"], splits=splits,
                        stats={**stats, "seed": settings["seed"], "samples_per_shard": settings["samples_per_shard"]},
                        content=settings["content"], format=settings["format"],
                        block_samples=settings["geometry"]["block_samples"])
    write_manifest(store, manifest)
    return manifest


def _check_train_split(stats: dict[str, int], settings: dict[str, Any]) -> None:
    layout, corpus = settings["layout"], settings["corpus"]
    if stats["documents"] == 0:
        raise CorpusError(f"corpus {corpus!r} has no training documents; check --corpus, --max-chars and --limit")
    if layout["packing"] == "pad" and stats["truncated"] * 2 > stats["documents"]:
        # Most documents would lose their end: the user almost certainly meant a longer sequence.
        raise ShardingError(
            f"--seq-len {layout['seq_len']} truncates {stats['truncated']} of {stats['documents']} documents with "
            f"--packing pad; --seq-len {stats['longest'] + 2} fits every document (--seq-len "
            f"{stats['longest_99'] + 2} fits 99% or more)")
    if stats["samples"] == 0:
        raise ShardingError(
            f"corpus {corpus!r} has {stats['tokens']} training tokens, too few for one packed sample of --seq-len "
            f"{layout['seq_len']}; lower --seq-len or use a larger corpus")
