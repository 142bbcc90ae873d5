"""Prompt/response data for supervised fine-tuning (SFT): records -> shards that record each
sample's prompt length.

    proseco tokenizer shard --packing sft --corpus chat.jsonl --tokenizer DIR --seq-len 256 --out DIR

Records are JSON objects, one per line of a ``.jsonl`` file (``.jsonl.gz``, ``.jsonl.zst``), or of
every such file under a folder (in path order), in either of two forms:

- chat: ``{"messages": [{"role": "system" | "user" | "assistant" | ..., "content": "..."}, ...]}``;
  the last message is the response and must be the assistant's, everything before it the prompt;
- ``{"prompt": "...", "response": "..."}``, the same as the chat ``[user: prompt, assistant: response]``.

The template. A tokenizer with a chat template (kind "hf", e.g. LLaDA-8B's imported with
``proseco tokenizer import-hf``) renders the prompt messages with it, as transformers'
apply_chat_template(add_generation_prompt=True) does, less the BOS text it puts first (the sample's
BOS id stands for it); the folder records `HF_TEMPLATE` and the template's sha256. The other kinds
(SentencePiece, characters, GPT-2 r50k) carry no chat template or chat special tokens, so prompts
are rendered with a plain one (`PLAIN_TEMPLATE`, recorded in the folder): every prompt message as
``"{role}: {content}\\n"``, then the generation cue ``"assistant: "``. Either way the response is
its content as it is, and prompt and response are tokenized apart, so the boundary is exact.

A sample, as LLaDA's SFT lays it out (its GUIDELINES.md): ``[BOS] + prompt + response + [EOS]``,
padded to seq_len with more EOS; its prompt length counts the BOS and the prompt. The padding EOS
belong to the response: the loss covers them (the model learns where an answer ends). A response
longer than its room keeps its first tokens (no EOS then; counted as truncated). A sample whose
prompt leaves no room for one response token is dropped and counted (``{split}_dropped_samples``
in the manifest's stats, printed by the command).

Splits and order as `proseco tokenizer shard` does them: a record goes to val when the hash of its
rendered text falls below val_fraction (at least one record on each side); records are read in
chunks of about `chunk_chars` characters, each chunk's samples shuffled (seeded by seed, split and
chunk) and written as ``{split}/shard-{chunk:06d}-{part:04d}.tar`` with keys chunk * KEY_SPAN + i.
The folder is an ordinary shard folder (manifest ``packing: "sft"``) plus ``prompt_lengths/``:
``{split}.npy`` (uint32, one per sample in manifest order) and ``info.json`` (the manifest
fingerprint, each array's sha256, the template), read by pretrain/data/prompts.py. One process
reads and writes; `workers` processes tokenize. Not split into tasks (--task-index): an SFT set is
sharded in one run.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.errors import UserError
from tokenizer.corpora import DEFAULT_VAL_FRACTION, SPLITS, jsonl_records
from tokenizer.format import (
    FORMAT,
    FORMAT_V1,
    FORMATS,
    MANIFEST,
    Geometry,
    Manifest,
    ShardInfo,
    SplitInfo,
    default_block_samples,
    shard_bytes,
    token_dtype,
    write_manifest,
)
from tokenizer.storage import Store, is_url, upload_folder
from tokenizer.tasks import DEFAULT_CHUNK_CHARS, KEY_SPAN
from tokenizer.tokenizers import CONFIG_FILE, MODEL_FILES, Tokenizer, TokenizerError, load_tokenizer
from tokenizer.train import atomic_folder, check_output
from tokenizer.transfer import TOKENIZER_COPY

SFT_PACKING = "sft"
"""The manifest's `packing` of a folder of prompt/response samples (it has prompt lengths)."""
PROMPTS_DIR = "prompt_lengths"
INFO_FILE = "info.json"
PLAIN_TEMPLATE = "plain-v1: '{role}: {content}\\n' per prompt message, then 'assistant: '"
"""The name under which the folder records how its prompts were rendered."""
GENERATION_CUE = "assistant: "
HF_TEMPLATE = ("hf-chat-v1: the tokenizer's chat_template with add_generation_prompt=True, "
               "less its leading BOS text")
"""Recorded for prompts rendered by a tokenizer's own chat template (with "template_sha256")."""
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
BATCH_RECORDS = 2048
"""Records per tokenizing call of a worker."""


class SFTDataError(UserError):
    """SFT records that cannot be read or sharded as asked; the message names the fix."""


def prompt_files(split: str) -> tuple[str, str]:
    """The paths, relative to the shard folder, of the description and of one split's prompt lengths."""
    return f"{PROMPTS_DIR}/{INFO_FILE}", f"{PROMPTS_DIR}/{split}.npy"


# ---------------------------------------------------------------------------------------------
# Records -> (prompt text, response text)


@dataclass(frozen=True)
class Pair:
    prompt: str
    """The rendered prompt, generation cue included."""
    response: str


def render_prompt(messages: list[dict[str, str]]) -> str:
    """The plain template's prompt for chat messages (those before the response): what the model
    sees before it answers, also at sampling time."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + GENERATION_CUE


PromptRenderer = Callable[[list[dict[str, Any]]], str]
"""Prompt messages -> the prompt's text, generation cue included."""


def prompt_renderer(tokenizer: Tokenizer | None) -> PromptRenderer:
    """The tokenizer's chat template when it has one, else the plain template."""
    if tokenizer is None or tokenizer.chat_template_sha256 is None:
        return render_prompt
    return functools.partial(tokenizer.chat_prompt, strip_bos=True)


def template_info(tokenizer: Tokenizer | None) -> dict[str, str]:
    """How a folder's prompts were rendered, for prompt_lengths/info.json."""
    if tokenizer is None or tokenizer.chat_template_sha256 is None:
        return {"template": PLAIN_TEMPLATE}
    return {"template": HF_TEMPLATE, "template_sha256": tokenizer.chat_template_sha256}


def render_record(record: Any, where: str, render: PromptRenderer = render_prompt) -> Pair:
    """The prompt and response of one record (chat messages or prompt/response fields)."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, dict) and "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise SFTDataError(f"{where}: a record needs \"messages\" (chat) or \"prompt\" and \"response\" fields, "
                           f"this one has {keys}")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise SFTDataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": str, \"content\": str}}")
    if messages[-1]["role"] != "assistant":
        raise SFTDataError(f"{where}: the last message is the response and must have role \"assistant\", "
                           f"not {messages[-1]['role']!r}")
    try:
        return Pair(render(messages[:-1]), messages[-1]["content"])
    except TokenizerError as err:
        raise SFTDataError(f"{where}: {err}") from None


def record_files(corpus: str | Path) -> list[Path]:
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(RECORD_SUFFIXES))
        if not files:
            raise SFTDataError(f"folder {path} holds no {', '.join(RECORD_SUFFIXES)} files of SFT records")
        return files
    if path.is_file() and path.name.endswith(RECORD_SUFFIXES):
        return [path]
    raise SFTDataError(f"--corpus {corpus} is not a {', '.join(RECORD_SUFFIXES)} file or a folder of them "
                       "(SFT records: one JSON object per line)")


def _all_pairs(files: list[Path], render: PromptRenderer) -> Iterator[Pair]:
    for path in files:
        for number, record in jsonl_records(path, SFTDataError):
            yield render_record(record, f"{path}:{number}", render)


def _hash_fraction(pair: Pair) -> float:
    """A number in [0, 1) from a record's rendered text: the split does not depend on file order."""
    digest = hashlib.sha256(json.dumps([pair.prompt, pair.response]).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def iter_pairs(corpus: str | Path, split: str, *, val_fraction: float | None = None,
               limit: int | None = None, tokenizer: Tokenizer | None = None) -> Iterator[Pair]:
    """The (prompt, response) pairs of `split`, always in the same order (two passes over the files:
    which records are val, then the records); prompts rendered by `tokenizer`'s chat template when
    it has one (`prompt_renderer`)."""
    val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if not 0.0 <= val_fraction < 1.0:
        raise SFTDataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and limit < 1:
        raise SFTDataError(f"--limit must be at least 1, got {limit}")
    files = record_files(corpus)
    render = prompt_renderer(tokenizer)
    hashes = [_hash_fraction(pair) for pair in _all_pairs(files, render)]
    in_val = [h < val_fraction for h in hashes]
    if len(hashes) >= 2 and val_fraction > 0 and not any(in_val):
        in_val[hashes.index(min(hashes))] = True
    if len(hashes) >= 2 and all(in_val):
        in_val[hashes.index(max(hashes))] = False
    count = 0
    for pair, is_val in zip(_all_pairs(files, render), in_val):
        if is_val == (split == "val"):
            if limit is not None and count >= limit:
                return
            count += 1
            yield pair


# ---------------------------------------------------------------------------------------------
# Pairs -> fixed-length samples


@dataclass(frozen=True)
class SFTLayout:
    seq_len: int
    dtype: str
    bos_id: int
    eos_id: int


def sft_rows(prompts: list[list[int]], responses: list[list[int]],
             layout: SFTLayout) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Samples [n, seq_len] (BOS + prompt + response + EOS padding), their prompt lengths (BOS
    included) and statistics: documents, tokens, samples, dropped_samples (no room for one response
    token), truncated (responses cut, or without room for their EOS), dropped_tokens."""
    length = layout.seq_len
    rows = np.full((len(prompts), length), layout.eos_id, dtype=layout.dtype)
    prompt_lengths = np.zeros(len(prompts), dtype=np.uint32)
    keep = np.zeros(len(prompts), dtype=bool)
    stats = {"documents": len(prompts), "tokens": 0, "dropped_samples": 0, "truncated": 0, "dropped_tokens": 0}
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        stats["tokens"] += len(prompt) + len(response)
        prefix = 1 + len(prompt)
        if prefix + 1 > length:
            stats["dropped_samples"] += 1
            stats["dropped_tokens"] += len(prompt) + len(response)
            continue
        room = length - prefix
        body = response[:room]
        if len(response) + 1 > room:  # cut, or no EOS fits after it
            stats["truncated"] += 1
            stats["dropped_tokens"] += len(response) - len(body)
        rows[index, 0] = layout.bos_id
        rows[index, 1:prefix] = prompt
        rows[index, prefix: prefix + len(body)] = body
        prompt_lengths[index] = prefix
        keep[index] = True
    stats["samples"] = int(keep.sum())
    return rows[keep], prompt_lengths[keep], stats


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(folder: str, sha256: str) -> Tokenizer:
    return load_tokenizer(folder)  # keyed by sha256 too: a folder rewritten in place is loaded again


def _encode(task: tuple[str, str, list[str], list[str]]) -> tuple[list[list[int]], list[list[int]]]:
    folder, sha256, prompts, responses = task
    tokenizer = _cached_tokenizer(folder, sha256)
    return tokenizer.encode_batch(prompts), tokenizer.encode_batch(responses)


def _chunks(pairs: Iterable[Pair], chunk_chars: int) -> Iterator[list[Pair]]:
    chunk: list[Pair] = []
    chars = 0
    for pair in pairs:
        chunk.append(pair)
        chars += len(pair.prompt) + len(pair.response)
        if chars >= chunk_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# The folder


@dataclass(frozen=True)
class SFTJob:
    corpus: str
    tokenizer: Tokenizer
    layout: SFTLayout
    geometry: Geometry
    shard_format: str
    seed: int
    samples_per_shard: int
    chunk_chars: int
    val_fraction: float | None
    limit: int | None


def shard_sft(corpus: str | Path, tokenizer: str | Path, seq_len: int, out: str | Path, *, workers: int = 1,
              overwrite: bool = False, seed: int = 0, samples_per_shard: int = 4096, shard_format: str = FORMAT,
              chunk_chars: int = DEFAULT_CHUNK_CHARS, val_fraction: float | None = None,
              limit: int | None = None) -> Manifest:
    """Shard the SFT records of `corpus` (a JSONL file or folder) into `out` (a path or URL: a URL
    is written locally, then uploaded with the manifest last); returns the manifest."""
    tok = load_tokenizer(tokenizer)
    if seq_len < 3:
        raise SFTDataError(f"--seq-len {seq_len} leaves no room for BOS, a prompt and a response; use at least 3")
    if shard_format not in FORMATS:
        raise SFTDataError(f"--format {shard_format!r} is unknown; choose one of {', '.join(FORMATS)}")
    for name, value in (("--samples-per-shard", samples_per_shard), ("--workers", workers)):
        if value < 1:
            raise SFTDataError(f"{name} must be at least 1, got {value}")
    if chunk_chars < 1:
        raise SFTDataError(f"--chunk-mib must be positive, got {chunk_chars / (1 << 20)}")
    dtype = token_dtype(tok.vocab_size)
    blocked = shard_format != FORMAT_V1
    job = SFTJob(corpus=str(corpus), tokenizer=tok, layout=SFTLayout(seq_len, dtype, tok.bos_id, tok.eos_id),
                 geometry=Geometry(seq_len, dtype, default_block_samples(seq_len, dtype) if blocked else 1, blocked),
                 shard_format=shard_format, seed=seed, samples_per_shard=samples_per_shard, chunk_chars=chunk_chars,
                 val_fraction=val_fraction, limit=limit)
    if is_url(out):
        with tempfile.TemporaryDirectory(prefix="proseco-sft-") as scratch:
            manifest = _write_folder(job, Path(scratch) / "out", workers, overwrite=False)
            upload_folder(Path(scratch) / "out", str(out))
        return manifest
    check_output(Path(out), overwrite, MANIFEST)  # before any work
    return _write_folder(job, Path(out), workers, overwrite)


def _write_folder(job: SFTJob, out: Path, workers: int, overwrite: bool) -> Manifest:
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        with atomic_folder(out, overwrite, MANIFEST) as tmp:
            store = Store(tmp)
            for name in (*MODEL_FILES[job.tokenizer.kind], CONFIG_FILE):
                store.write_bytes(f"{TOKENIZER_COPY}/{name}", (job.tokenizer.folder / name).read_bytes())
            splits, stats, lengths = {}, {}, {}
            for split_index, split in enumerate(SPLITS):
                splits[split], split_stats, lengths[split] = _write_split(job, store, split_index, split, pool)
                stats.update({f"{split}_{key}": value for key, value in split_stats.items()})
            _check_train(stats, job)
            manifest = Manifest(seq_len=job.layout.seq_len, dtype=job.layout.dtype, packing=SFT_PACKING,
                                corpus=_describe(job), tokenizer_sha256=job.tokenizer.sha256,
                                vocab_size=job.tokenizer.vocab_size, splits=splits,
                                stats={**stats, "seed": job.seed, "samples_per_shard": job.samples_per_shard},
                                content="text", format=job.shard_format, block_samples=job.geometry.block_samples)
            manifest.fingerprint = manifest.compute_fingerprint()
            _write_prompt_lengths(store, manifest.fingerprint, lengths, template_info(job.tokenizer))
            write_manifest(store, manifest)  # last: a folder with a manifest is complete
    finally:
        if pool is not None:
            pool.terminate()
    return manifest


def _write_split(job: SFTJob, store: Store, split_index: int, split: str,
                 pool) -> tuple[SplitInfo, dict[str, int], np.ndarray]:
    info = SplitInfo()
    stats = dict.fromkeys(("documents", "tokens", "samples", "dropped_samples", "truncated", "dropped_tokens"), 0)
    lengths: list[np.ndarray] = []
    folder, sha256 = str(job.tokenizer.folder), job.tokenizer.sha256
    pairs = iter_pairs(job.corpus, split, val_fraction=job.val_fraction, limit=job.limit, tokenizer=job.tokenizer)
    for chunk, chunk_pairs in enumerate(_chunks(pairs, job.chunk_chars)):
        if chunk >= 10 ** 5:
            raise SFTDataError(f"{split} has more than 10^5 chunks; raise --chunk-mib")
        tasks = [(folder, sha256, [p.prompt for p in chunk_pairs[i: i + BATCH_RECORDS]],
                  [p.response for p in chunk_pairs[i: i + BATCH_RECORDS]])
                 for i in range(0, len(chunk_pairs), BATCH_RECORDS)]
        encoded = pool.map(_encode, tasks) if pool is not None else [_encode(task) for task in tasks]
        prompts = [ids for batch in encoded for ids in batch[0]]
        responses = [ids for batch in encoded for ids in batch[1]]
        rows, prompt_lengths, chunk_stats = sft_rows(prompts, responses, job.layout)
        for key, value in chunk_stats.items():
            stats[key] += value
        # The loader reads contiguous runs of a shard: neighbours must be unrelated.
        order = np.random.default_rng(np.random.SeedSequence([job.seed, split_index, chunk])).permutation(len(rows))
        rows, prompt_lengths = rows[order], prompt_lengths[order]
        for part, start in enumerate(range(0, len(rows), job.samples_per_shard)):
            relative = f"{split}/shard-{chunk:06d}-{part:04d}.tar"
            body = shard_bytes(rows[start: start + job.samples_per_shard], chunk * KEY_SPAN + start, job.geometry)
            store.write_bytes(relative, body)
            info.shards.append(ShardInfo(path=relative, samples=min(job.samples_per_shard, len(rows) - start),
                                         first_key=chunk * KEY_SPAN + start, bytes=len(body),
                                         sha256=hashlib.sha256(body).hexdigest()))
        lengths.append(prompt_lengths)
    info.samples = sum(s.samples for s in info.shards)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.uint32)
    return info, stats, all_lengths


def _write_prompt_lengths(store: Store, fingerprint: str, lengths: dict[str, np.ndarray],
                          template: dict[str, str]) -> None:
    info: dict[str, Any] = {"fingerprint": fingerprint, **template, "splits": {}}
    for split, values in lengths.items():
        buffer = io.BytesIO()
        np.save(buffer, values.astype(np.uint32), allow_pickle=False)
        raw = buffer.getvalue()
        store.write_bytes(prompt_files(split)[1], raw)
        info["splits"][split] = {"samples": int(len(values)), "sha256": hashlib.sha256(raw).hexdigest()}
    store.write_bytes(prompt_files("train")[0], json.dumps(info, indent=2).encode())


def _describe(job: SFTJob) -> str:
    settings = {"val_fraction": job.val_fraction, "limit": job.limit}
    chosen = ", ".join(f"{key}={value}" for key, value in settings.items() if value is not None)
    name = f"sft:{Path(job.corpus).expanduser().resolve()}"
    return f"{name}({chosen})" if chosen else name


def _check_train(stats: dict[str, int], job: SFTJob) -> None:
    if stats.get("train_documents", 0) == 0:
        raise SFTDataError(f"{job.corpus} has no training records; check --corpus, --limit and --val-fraction")
    if stats["train_samples"] == 0:
        raise SFTDataError(f"every one of the {stats['train_documents']} training records has a prompt too long for "
                           f"--seq-len {job.layout.seq_len} (BOS + prompt + one response token); raise --seq-len")


def read_info(folder: str | Path) -> dict[str, Any]:
    """prompt_lengths/info.json of an SFT shard folder (path or URL)."""
    return json.loads(Store(folder).read_bytes(prompt_files("train")[0]))


__all__ = ["HF_TEMPLATE", "PLAIN_TEMPLATE", "SFT_PACKING", "Pair", "SFTDataError", "iter_pairs", "prompt_files",
           "prompt_renderer", "read_info", "render_prompt", "render_record", "sft_rows", "shard_sft", "template_info"]
