"""Tokenize a corpus into fixed-length samples and write them as shuffled webdataset shards.

    proseco tokenizer shard --corpus shakespeare --tokenizer data/shakespeare/tokenizer \
        --seq-len 128 --out data/shakespeare/shards

Two layouts (`--packing`):

- pack (default for sentencepiece and gpt2, as MDLM wraps OpenWebText): every document's tokens
  followed by EOS, all concatenated and cut into chunks of seq_len - 2; a sample is
  [BOS] + chunk + [EOS]. The incomplete tail of each corpus chunk is dropped (stats:
  dropped_tokens, its EOS included).
- pad (default for char, i.e. SMILES): one document per sample, [BOS] + doc + [EOS] + [PAD]...;
  a document longer than seq_len - 2 keeps its first seq_len - 2 tokens, still followed by EOS
  (stats: truncated documents, dropped_tokens).

The corpus is streamed in chunks of about 64 MiB of text (`tokenizer.tasks`): samples are
shuffled within their chunk (seeded by (seed, split, chunk)) before they are written, because the
loader reads contiguous ranges of a shard: neighbours in a shard must be unrelated. A corpus
smaller than one chunk is shuffled whole. Tokenizing runs on `workers` processes; the output
depends neither on their number nor on how many tasks share the work (`shard_task` + `merge_shards`
for a Slurm array). `shard_corpus` writes a local folder in a temporary folder that becomes `out`
only when complete, and a URL by uploading such a folder, manifest last.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokenizer.corpora import CONTENTS, builtin_content, describe_corpus
from tokenizer.format import (
    FORMAT,
    FORMAT_V1,
    FORMATS,
    MANIFEST,
    Geometry,
    Manifest,
    ShardError,
    ShardReader,
    SplitInfo,
    default_block_samples,
    read_manifest,
    shard_bytes,
    token_dtype,
    write_manifest,
)
from tokenizer.storage import Store, is_url, upload_folder
from tokenizer.tasks import (
    DEFAULT_CHUNK_CHARS,
    Layout,
    ShardingError,
    ShardJob,
    join_documents,
    merge,
    pack_stream,
    pad_documents,
    run_task,
)
from tokenizer.tokenizers import CONFIG_FILE, Tokenizer, TokenizerError, compute_sha256, load_tokenizer, read_config
from tokenizer.train import atomic_folder, check_output
from tokenizer.transfer import TOKENIZER_COPY, local_tokenizer

PACKINGS = ("pack", "pad")
DEFAULT_SAMPLES_PER_SHARD = 4096

__all__ = ["Layout", "ShardingError", "join_documents", "merge_shards", "pack_stream", "pad_documents",
           "shard_corpus", "shard_task", "verify_shards"]


def default_packing(tokenizer: Tokenizer) -> str:
    return "pad" if tokenizer.kind == "char" else "pack"


def _check_options(seq_len: int, packing: str, samples_per_shard: int, workers: int, content: str,
                   shard_format: str, chunk_chars: int) -> None:
    if packing not in PACKINGS:
        raise ShardingError(f"--packing {packing!r} is unknown; choose one of {', '.join(PACKINGS)}")
    if content not in CONTENTS:
        raise ShardingError(f"--content {content!r} is unknown; choose one of {', '.join(CONTENTS)}")
    if shard_format not in FORMATS:
        raise ShardingError(f"--format {shard_format!r} is unknown; choose one of {', '.join(FORMATS)}")
    if seq_len < 3:
        raise ShardingError(f"--seq-len {seq_len} leaves no room between BOS and EOS; use at least 3 (e.g. 128)")
    if samples_per_shard < 1:
        raise ShardingError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if workers < 1:
        raise ShardingError(f"--workers must be at least 1, got {workers}")
    if chunk_chars < 1:
        raise ShardingError(f"--chunk-mib must be positive, got {chunk_chars / (1 << 20)}")


def make_job(corpus: str, tokenizer: str | Path, seq_len: int, *, packing: str | None = None,
             samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, workers: int = 2, seed: int = 0,
             text_field: str | None = None, content: str | None = None, shard_format: str = FORMAT,
             chunk_chars: int = DEFAULT_CHUNK_CHARS, **corpus_options: Any) -> tuple[ShardJob, Tokenizer]:
    """The job the options describe and its tokenizer (options checked, nothing written)."""
    tok = load_tokenizer(tokenizer)
    packing = packing or default_packing(tok)
    content = content or builtin_content(corpus)
    _check_options(seq_len, packing, samples_per_shard, workers, content, shard_format, chunk_chars)
    dtype = token_dtype(tok.vocab_size)
    blocked = shard_format != FORMAT_V1
    geometry = Geometry(seq_len, dtype, default_block_samples(seq_len, dtype) if blocked else 1, blocked)
    chosen = {"text_field": text_field, **corpus_options}
    # Unset options are left out, so that the CLI and a call with fewer keywords describe one job.
    job = ShardJob(corpus=corpus, corpus_options={k: v for k, v in chosen.items() if v is not None and v is not False},
                   corpus_description=describe_corpus(corpus, text_field, **corpus_options),
                   tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size, content=content,
                   layout=Layout(packing, seq_len, dtype, tok.bos_id, tok.eos_id, tok.pad_id), geometry=geometry,
                   format=shard_format, seed=seed, samples_per_shard=samples_per_shard, chunk_chars=chunk_chars)
    return job, tok


def shard_corpus(corpus: str, tokenizer: str | Path, seq_len: int, out: str | Path, *, workers: int = 2,
                 overwrite: bool = False, **options: Any) -> Manifest:
    """Tokenize both splits of `corpus` into shuffled shards under `out`; returns the manifest written.

    `out` is a local folder or a URL (s3://bucket/prefix, ...): a URL is written to a local
    temporary folder first and uploaded, the manifest last. Options are `make_job`'s: packing,
    samples_per_shard, seed, text_field, content ("text" or "smiles"; by default the content a
    built-in corpus declares, text for a PATH corpus), shard_format (FORMAT, v2, or FORMAT_V1),
    chunk_chars, and those of `tokenizer.corpora.iter_documents` (max_chars, limit, val_fraction, ...).
    """
    if is_url(out):
        return _shard_to_url(corpus, tokenizer, seq_len, str(out), workers=workers, overwrite=overwrite, **options)
    out = Path(out)
    check_output(out, overwrite, MANIFEST)  # before any work
    job, tok = make_job(corpus, tokenizer, seq_len, workers=workers, **options)
    with atomic_folder(out, overwrite, MANIFEST) as tmp:
        run_task(job, tok, Store(tmp), workers=workers)
        manifest = merge(Store(tmp))
        shutil.rmtree(tmp / ".tasks")  # the records of a finished job are the manifest now
    return manifest


def shard_task(corpus: str, tokenizer: str | Path, seq_len: int, out: str | Path, *, task_index: int,
               num_tasks: int, workers: int = 2, **options: Any) -> dict[str, int]:
    """Task `task_index` of `num_tasks` of a sharding job, written straight into `out` (a path or
    URL); a task run again skips the chunks it finished. `merge_shards(out)` after the last."""
    store = Store(out)
    try:
        store.read_bytes(MANIFEST)
    except (FileNotFoundError, NotADirectoryError):
        pass
    else:
        raise ShardingError(f"{store.url(MANIFEST)} exists: the folder is merged already; choose another --out")
    job, tok = make_job(corpus, tokenizer, seq_len, workers=workers, **options)
    return run_task(job, tok, store, task_index, num_tasks, workers)


def merge_shards(out: str | Path) -> Manifest:
    """Write the manifest of a folder the tasks of one job have filled (see `shard_task`)."""
    return merge(Store(out))


def _shard_to_url(corpus: str, tokenizer: str | Path, seq_len: int, url: str, *, overwrite: bool,
                  **options: Any) -> Manifest:
    """`shard_corpus` into a URL: shards written locally, then uploaded with the manifest last, so
    that a reader never finds a manifest whose shards are not all there."""
    target = Store(url)
    if not overwrite:
        try:
            target.read_bytes(MANIFEST)
        except FileNotFoundError:
            pass
        else:
            raise ShardingError(f"{target.url(MANIFEST)} already exists; pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="proseco-shards-") as scratch:
        manifest = shard_corpus(corpus, tokenizer, seq_len, Path(scratch) / "out", **options)
        upload_folder(Path(scratch) / "out", url)
    return manifest


def upload_shards(folder: str | Path, url: str) -> int:
    """Upload a finished local shard folder to `url` (after `verify_shards` finds nothing); returns
    the number of files written."""
    problems = verify_shards(folder)
    if problems:
        raise ShardError(f"{folder} has {len(problems)} problem(s) ({problems[0]}; ...): fix them before "
                         "uploading (`proseco tokenizer verify`)")
    return upload_folder(folder, url)


def verify_shards(folder: str | Path) -> list[str]:
    """Problems of a shard folder (path or URL): missing, resized or altered shards, key gaps, a
    tokenizer copy that differs."""
    store = Store(folder)
    try:
        manifest = read_manifest(store)
    except ShardError as err:
        return [str(err)]
    problems = []
    if manifest.fingerprint != manifest.compute_fingerprint():
        problems.append(f"{MANIFEST}: fingerprint {manifest.fingerprint} does not match its content (edited?)")
    if manifest.dtype != token_dtype(manifest.vocab_size):
        problems.append(f"{MANIFEST}: dtype {manifest.dtype} does not suit vocab_size {manifest.vocab_size}")
    geometry = Geometry.of(manifest)
    for name, split in manifest.splits.items():
        next_key = 0
        for shard in split.shards:
            # v1 keys count the split's samples; v2 keys only increase (chunk c starts at c * KEY_SPAN).
            if shard.first_key != next_key if manifest.format == FORMAT_V1 else shard.first_key < next_key:
                problems.append(f"{shard.path}: first_key {shard.first_key}, expected "
                                f"{'' if manifest.format == FORMAT_V1 else 'at least '}{next_key}")
            next_key = shard.first_key + shard.samples
            try:
                size = store.size(shard.path)
            except (FileNotFoundError, NotADirectoryError):
                problems.append(f"{shard.path}: missing")
                continue
            if size != shard.bytes:
                problems.append(f"{shard.path}: {size} bytes, the manifest says {shard.bytes}")
            elif store.sha256(shard.path, size) != shard.sha256:
                problems.append(f"{shard.path}: sha256 differs from the manifest (the file was altered)")
            elif geometry.shard_bytes(shard.samples) != size:
                problems.append(f"{shard.path}: {size} bytes cannot hold {shard.samples} samples of "
                                f"{manifest.format} with seq_len {manifest.seq_len}")
        if sum(s.samples for s in split.shards) != split.samples:
            problems.append(f"split {name}: {split.samples} samples in the manifest, its shards hold "
                            f"{sum(s.samples for s in split.shards)}")
    try:
        tokenizer_folder = _tokenizer_copy(store, manifest)
        config = read_config(tokenizer_folder)
        actual = compute_sha256(tokenizer_folder, config)
        if actual != manifest.tokenizer_sha256:
            problems.append(f"{TOKENIZER_COPY}/: sha256 {actual[:16]}... differs from the manifest's "
                            f"{manifest.tokenizer_sha256[:16]}...")
        if config["vocab_size"] != manifest.vocab_size:
            problems.append(f"{TOKENIZER_COPY}/{CONFIG_FILE}: vocab_size {config['vocab_size']}, "
                            f"the manifest says {manifest.vocab_size}")
    except TokenizerError as err:
        problems.append(f"{TOKENIZER_COPY}/: {err}")
    return problems


def _tokenizer_copy(store: Store, manifest: Manifest) -> Path:
    """The folder's tokenizer as a local folder (downloaded and cached for a URL)."""
    return store.path(TOKENIZER_COPY) if store.local else local_tokenizer(store, manifest.tokenizer_sha256)


def migrate_shards(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Manifest:
    """Rewrite a shard folder (any format) as the current format: the same samples under the same
    keys in the same shard files, so the same batches at every position; returns the new manifest.
    Damaged samples are refused (migrating would launder them): verify and re-shard instead."""
    store = Store(source)
    old = read_manifest(store)
    out = Path(out)
    block_samples = default_block_samples(old.seq_len, old.dtype)
    geometry = Geometry(old.seq_len, old.dtype, block_samples, blocked=True)
    with atomic_folder(out, overwrite, MANIFEST) as tmp:
        tokenizer_folder = _tokenizer_copy(store, old)
        shutil.copytree(tokenizer_folder, tmp / TOKENIZER_COPY)
        splits = {}
        for name, split in old.splits.items():
            infos = SplitInfo(samples=split.samples)
            for shard in split.shards:
                tokens, ok = ShardReader(store, shard, Geometry.of(old)).read(0, shard.samples)
                if not ok.all():
                    raise ShardError(f"{store.url(shard.path)}: {int((~ok).sum())} of {shard.samples} samples are "
                                     "unreadable; re-create the shards with `proseco tokenizer shard` instead")
                body = shard_bytes(tokens.astype(old.dtype), shard.first_key, geometry)
                Store(tmp).write_bytes(shard.path, body)
                infos.shards.append(replace(shard, bytes=len(body), sha256=hashlib.sha256(body).hexdigest()))
            splits[name] = infos
        manifest = replace(old, splits=splits, format=FORMAT, block_samples=block_samples, fingerprint="")
        write_manifest(tmp, manifest)
    return manifest
