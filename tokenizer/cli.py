"""`proseco tokenizer train|import-hf|shard|merge|verify|migrate|upload`: text -> tokenizer folder -> token shards."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from pretrain.errors import UserError


def _corpus_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"text_field": args.text_field, "max_chars": args.max_chars, "limit": args.limit,
            "val_fraction": args.val_fraction, "line_documents": args.line_documents}


def _available_cores() -> int:
    """Cores this process may run on (its CPU affinity: what Slurm or taskset granted)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _train(args: argparse.Namespace) -> None:
    from tokenizer.train import train_tokenizer

    start = time.perf_counter()
    tokenizer = train_tokenizer(args.corpus, args.kind, args.out, args.vocab_size, overwrite=args.overwrite,
                                sample_sentences=args.sample_sentences, max_train_chars=args.max_train_chars,
                                **_corpus_options(args))
    print(f"wrote {args.out}: {tokenizer.kind} tokenizer, vocab_size {tokenizer.vocab_size} (mask {tokenizer.mask_id}, "
          f"pad {tokenizer.pad_id}, bos {tokenizer.bos_id}, eos {tokenizer.eos_id}), sha256 {tokenizer.sha256[:16]}, "
          f"{time.perf_counter() - start:.1f} s")


def _import_hf(args: argparse.Namespace) -> None:
    from tokenizer.hf import import_hf_tokenizer

    tokenizer = import_hf_tokenizer(args.source, args.out, mask_token=args.mask_token, overwrite=args.overwrite)
    template = tokenizer.chat_template_sha256
    print(f"wrote {args.out}: hf tokenizer, vocab_size {tokenizer.vocab_size} (mask {tokenizer.mask_id}, "
          f"pad {tokenizer.pad_id}, bos {tokenizer.bos_id}, eos {tokenizer.eos_id}), chat template "
          f"{'none' if template is None else 'sha256 ' + template[:16]}, sha256 {tokenizer.sha256[:16]}")


def _shard(args: argparse.Namespace) -> None:
    from tokenizer.sft import SFT_PACKING
    from tokenizer.shard import shard_corpus, shard_task

    start = time.perf_counter()
    if args.packing == SFT_PACKING:
        _shard_sft(args, start)
        return
    options = dict(packing=args.packing, samples_per_shard=args.samples_per_shard, workers=args.workers,
                   seed=args.seed, content=args.content, shard_format=args.format,
                   chunk_chars=int(args.chunk_mib * (1 << 20)), **_corpus_options(args))
    if args.task_index is not None or args.num_tasks is not None:
        if args.task_index is None or args.num_tasks is None:
            raise UserError("--task-index and --num-tasks go together (e.g. --task-index $SLURM_ARRAY_TASK_ID "
                            "--num-tasks $SLURM_ARRAY_TASK_COUNT)")
        counts = shard_task(args.corpus, args.tokenizer, args.seq_len, args.out, task_index=args.task_index,
                            num_tasks=args.num_tasks, **options)
        print(f"task {args.task_index} of {args.num_tasks}: wrote {counts['written']} chunks into {args.out}, "
              f"skipped {counts['skipped']} finished before, {time.perf_counter() - start:.1f} s; after the last "
              f"task: proseco tokenizer merge {args.out}")
        return
    manifest = shard_corpus(args.corpus, args.tokenizer, args.seq_len, args.out, overwrite=args.overwrite, **options)
    splits = ", ".join(f"{name} {split.samples} samples in {len(split.shards)} shards"
                       for name, split in manifest.splits.items())
    stats = manifest.stats
    print(f"wrote {args.out}: {splits}; seq_len {manifest.seq_len}, {manifest.packing}, "
          f"{stats['train_tokens'] + stats['val_tokens']} document tokens, "
          f"{stats['train_truncated'] + stats['val_truncated']} truncated documents, "
          f"{stats['train_dropped_tokens'] + stats['val_dropped_tokens']} dropped tokens; "
          f"fingerprint {manifest.fingerprint}, {time.perf_counter() - start:.1f} s")


def _shard_sft(args: argparse.Namespace, start: float) -> None:
    """`shard --packing sft`: prompt/response records into shards with prompt lengths (tokenizer/sft.py)."""
    from tokenizer.sft import shard_sft

    for flag, value in (("--task-index/--num-tasks", args.task_index is not None or args.num_tasks is not None),
                        ("--text-field", args.text_field), ("--line-documents", args.line_documents),
                        ("--max-chars", args.max_chars), ("--content", args.content)):
        if value:
            raise UserError(f"{flag} does not apply to --packing sft (records with messages or prompt/response "
                            "fields, sharded in one run); drop it")
    manifest = shard_sft(args.corpus, args.tokenizer, args.seq_len, args.out, workers=args.workers,
                         overwrite=args.overwrite, seed=args.seed, samples_per_shard=args.samples_per_shard,
                         shard_format=args.format, chunk_chars=int(args.chunk_mib * (1 << 20)),
                         val_fraction=args.val_fraction, limit=args.limit)
    stats = manifest.stats
    splits = ", ".join(f"{name} {split.samples} samples ({stats[f'{name}_dropped_samples']} dropped: prompt too "
                       f"long, {stats[f'{name}_truncated']} responses truncated)"
                       for name, split in manifest.splits.items())
    print(f"wrote {args.out}: prompt/response samples with prompt lengths; {splits}; seq_len {manifest.seq_len}; "
          f"fingerprint {manifest.fingerprint}, {time.perf_counter() - start:.1f} s")


def _verify(args: argparse.Namespace) -> None:
    from tokenizer.shard import verify_shards

    problems = verify_shards(args.folder)
    if problems:
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        raise UserError(f"{args.folder}: {len(problems)} problem(s) listed above; rebuild it with "
                        "`proseco tokenizer shard ... --overwrite`")
    print(f"{args.folder}: ok")


def _merge(args: argparse.Namespace) -> None:
    from tokenizer.shard import merge_shards

    manifest = merge_shards(args.folder)
    splits = ", ".join(f"{name} {split.samples} samples in {len(split.shards)} shards"
                       for name, split in manifest.splits.items())
    print(f"wrote {args.folder}/manifest.json: {splits}; fingerprint {manifest.fingerprint}")


def _migrate(args: argparse.Namespace) -> None:
    from tokenizer.shard import migrate_shards

    start = time.perf_counter()
    manifest = migrate_shards(args.folder, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {manifest.format}, {manifest.block_samples} samples per member, the same samples "
          f"under the same keys; fingerprint {manifest.fingerprint}, {time.perf_counter() - start:.1f} s")


def _upload(args: argparse.Namespace) -> None:
    from tokenizer.shard import upload_shards

    files = upload_shards(args.folder, args.url)
    print(f"uploaded {files} files of {args.folder} to {args.url} (manifest last)")


def _add_corpus_arguments(parser: argparse.ArgumentParser, corpus_required: bool) -> None:
    parser.add_argument("--corpus", required=corpus_required,
                        help="shakespeare, moses, qm9, or a PATH: text file (documents separated by blank lines), "
                             "folder of .txt/.md files (one document each), or .jsonl file"
                             + ("" if corpus_required else " (not needed for --kind gpt2)"))
    parser.add_argument("--text-field", help='JSONL field holding the text (default "text")')
    parser.add_argument("--line-documents", action="store_true",
                        help="a text-file corpus holds one document per line (e.g. one SMILES per line)")
    parser.add_argument("--max-chars", type=int, help="keep only documents of at most this many characters")
    parser.add_argument("--limit", type=int, help="use at most this many documents per split")
    parser.add_argument("--val-fraction", type=float,
                        help="PATH corpora: fraction of documents held out for validation, by hash (default 0.01)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `tokenizer train|import-hf|shard|merge|verify|migrate|upload` on the top-level subparsers of
    `proseco`."""
    from tokenizer.corpora import CONTENTS
    from tokenizer.format import FORMAT, FORMAT_V1, FORMATS
    from tokenizer.sft import SFT_PACKING
    from tokenizer.shard import DEFAULT_SAMPLES_PER_SHARD, PACKINGS
    from tokenizer.tasks import DEFAULT_CHUNK_CHARS
    from tokenizer.train import KINDS, SPM_MAX_CHUNK_CHARS, SPM_MAX_SENTENCES

    tokenizer = sub.add_parser("tokenizer", help="train tokenizers and write token shards")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True)

    train = tokenizer_sub.add_parser("train", help="make a tokenizer folder from a corpus' train split")
    _add_corpus_arguments(train, corpus_required=False)
    train.add_argument("--kind", required=True, choices=KINDS,
                       help="bpe/unigram: lossless SentencePiece; char: one id per character; gpt2: r50k + mask")
    train.add_argument("--vocab-size", type=int,
                       help="bpe/unigram: number of ids incl. specials (required); char: upper bound; gpt2: 50258")
    train.add_argument("--out", required=True, help="tokenizer folder to create")
    train.add_argument("--sample-sentences", type=int, default=SPM_MAX_SENTENCES,
                       help=f"bpe/unigram: train on a seeded random sample of at most this many text chunks of "
                            f"up to {SPM_MAX_CHUNK_CHARS} characters (bounds memory; default {SPM_MAX_SENTENCES})")
    train.add_argument("--max-train-chars", type=int,
                       help="bpe/unigram: read only the first this many characters of the train split (bounds "
                            "time on a large corpus; default: all)")
    train.set_defaults(func=_train)

    import_hf = tokenizer_sub.add_parser("import-hf", help="make a tokenizer folder from a Hugging Face tokenizer "
                                                           "(tokenizer.json + tokenizer_config.json, e.g. LLaDA-8B's)")
    import_hf.add_argument("source", help="folder holding tokenizer.json, a hub cache entry (models--ORG--NAME), or "
                                          "ORG/NAME of a model in the local hub cache (nothing is downloaded)")
    import_hf.add_argument("--out", required=True, help="tokenizer folder to create (the HF files go to OUT/hf/)")
    import_hf.add_argument("--mask-token", help="the token the model uses as its mask (default: tokenizer_config's "
                                                "mask_token, else LLaDA's <|mdm_mask|> when the vocabulary has it)")
    import_hf.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    import_hf.set_defaults(func=_import_hf)

    shard = tokenizer_sub.add_parser("shard", help="tokenize a corpus into shuffled webdataset shards")
    _add_corpus_arguments(shard, corpus_required=True)
    shard.add_argument("--tokenizer", required=True, help="tokenizer folder (from `proseco tokenizer train`)")
    shard.add_argument("--seq-len", type=int, required=True, help="tokens per sample, BOS and EOS included")
    shard.add_argument("--out", required=True,
                       help="shard folder to create: a path or a URL (s3://bucket/prefix, gs://..., az://...; "
                            "written locally first, then uploaded with the manifest last)")
    shard.add_argument("--format", default=FORMAT, choices=FORMATS,
                       help=f"{FORMAT}: members of ~1 MiB blocks of samples, <1%% overhead (default); "
                            f"{FORMAT_V1}: one member per sample")
    shard.add_argument("--packing", choices=(*PACKINGS, SFT_PACKING),
                       help="pack: documents joined and cut (default for bpe/unigram/gpt2); "
                            "pad: one document per sample (default for char); sft: prompt/response records "
                            "(JSONL with messages or prompt/response fields), one per EOS-padded sample, with "
                            "each sample's prompt length beside the shards (docs/data.md)")
    shard.add_argument("--content", choices=CONTENTS,
                       help="what the documents are, which picks the judge of samples (default: the built-in "
                            "corpus' own, text for a PATH; e.g. --content smiles for a file of SMILES)")
    shard.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                       help=f"samples per tar file (default {DEFAULT_SAMPLES_PER_SHARD})")
    shard.add_argument("--workers", type=int, default=_available_cores(),
                       help="processes for tokenizing (default: every core this process may use, "
                            f"{_available_cores()} here; a Slurm task's --cpus-per-task)")
    shard.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default 0)")
    shard.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_CHARS / (1 << 20),
                       help="text per corpus chunk, the unit of shuffling, of memory and of task work (default "
                            f"{DEFAULT_CHUNK_CHARS >> 20}: samples are shuffled within a chunk)")
    shard.add_argument("--task-index", type=int,
                       help="run only task I of --num-tasks N (a Slurm array), writing its chunks into --out; "
                            "a re-run skips finished chunks; then `proseco tokenizer merge OUT`")
    shard.add_argument("--num-tasks", type=int, help="number of tasks sharing the corpus (with --task-index)")
    shard.set_defaults(func=_shard)

    verify = tokenizer_sub.add_parser("verify", help="check a shard folder (path or URL) against its manifest")
    verify.add_argument("folder", help="shard folder (holding manifest.json)")
    verify.set_defaults(func=_verify)

    merge = tokenizer_sub.add_parser("merge", help="write the manifest once every --task-index task has finished")
    merge.add_argument("folder", help="the --out of the tasks (path or URL)")
    merge.set_defaults(func=_merge)

    migrate = tokenizer_sub.add_parser("migrate", help=f"rewrite a shard folder as {FORMAT}, the same tokens")
    migrate.add_argument("folder", help="shard folder to read (path or URL; left as it is)")
    migrate.add_argument("--out", required=True, help="local shard folder to create")
    migrate.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    migrate.set_defaults(func=_migrate)

    upload = tokenizer_sub.add_parser("upload", help="copy a verified local shard folder to a URL, manifest last")
    upload.add_argument("folder", help="local shard folder")
    upload.add_argument("url", help="destination, e.g. s3://bucket/prefix (credentials from the environment)")
    upload.set_defaults(func=_upload)
