"""`proseco tokenizer train|shard|verify`: text -> tokenizer folder -> token shards."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pretrain.errors import UserError


def _corpus_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"text_field": args.text_field, "max_chars": args.max_chars, "limit": args.limit,
            "val_fraction": args.val_fraction, "line_documents": args.line_documents}


def _train(args: argparse.Namespace) -> None:
    from tokenizer.train import train_tokenizer

    start = time.perf_counter()
    tokenizer = train_tokenizer(args.corpus, args.kind, args.out, args.vocab_size, overwrite=args.overwrite,
                                **_corpus_options(args))
    print(f"wrote {args.out}: {tokenizer.kind} tokenizer, vocab_size {tokenizer.vocab_size} (mask {tokenizer.mask_id}, "
          f"pad {tokenizer.pad_id}, bos {tokenizer.bos_id}, eos {tokenizer.eos_id}), sha256 {tokenizer.sha256[:16]}, "
          f"{time.perf_counter() - start:.1f} s")


def _shard(args: argparse.Namespace) -> None:
    from tokenizer.shard import shard_corpus

    start = time.perf_counter()
    manifest = shard_corpus(args.corpus, args.tokenizer, args.seq_len, args.out, packing=args.packing,
                            samples_per_shard=args.samples_per_shard, workers=args.workers, seed=args.seed,
                            overwrite=args.overwrite, content=args.content, **_corpus_options(args))
    splits = ", ".join(f"{name} {split.samples} samples in {len(split.shards)} shards"
                       for name, split in manifest.splits.items())
    stats = manifest.stats
    print(f"wrote {args.out}: {splits}; seq_len {manifest.seq_len}, {manifest.packing}, "
          f"{stats['train_tokens'] + stats['val_tokens']} document tokens, "
          f"{stats['train_truncated'] + stats['val_truncated']} truncated documents, "
          f"{stats['train_dropped_tokens'] + stats['val_dropped_tokens']} dropped tokens; "
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
    """Register `tokenizer train|shard|verify` on the top-level subparsers of `proseco`."""
    from tokenizer.corpora import CONTENTS
    from tokenizer.shard import DEFAULT_SAMPLES_PER_SHARD, PACKINGS
    from tokenizer.train import KINDS

    tokenizer = sub.add_parser("tokenizer", help="train tokenizers and write token shards")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True)

    train = tokenizer_sub.add_parser("train", help="make a tokenizer folder from a corpus' train split")
    _add_corpus_arguments(train, corpus_required=False)
    train.add_argument("--kind", required=True, choices=KINDS,
                       help="bpe/unigram: lossless SentencePiece; char: one id per character; gpt2: r50k + mask")
    train.add_argument("--vocab-size", type=int,
                       help="bpe/unigram: number of ids incl. specials (required); char: upper bound; gpt2: 50258")
    train.add_argument("--out", required=True, help="tokenizer folder to create")
    train.set_defaults(func=_train)

    shard = tokenizer_sub.add_parser("shard", help="tokenize a corpus into shuffled webdataset shards")
    _add_corpus_arguments(shard, corpus_required=True)
    shard.add_argument("--tokenizer", required=True, help="tokenizer folder (from `proseco tokenizer train`)")
    shard.add_argument("--seq-len", type=int, required=True, help="tokens per sample, BOS and EOS included")
    shard.add_argument("--out", required=True, help="shard folder to create")
    shard.add_argument("--packing", choices=PACKINGS,
                       help="pack: documents joined and cut (default for bpe/unigram/gpt2); "
                            "pad: one document per sample (default for char)")
    shard.add_argument("--content", choices=CONTENTS,
                       help="what the documents are, which picks the judge of samples (default: the built-in "
                            "corpus' own, text for a PATH; e.g. --content smiles for a file of SMILES)")
    shard.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                       help=f"samples per tar file (default {DEFAULT_SAMPLES_PER_SHARD})")
    shard.add_argument("--workers", type=int, default=2, help="processes for tokenizing and writing (default 2)")
    shard.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default 0)")
    shard.set_defaults(func=_shard)

    verify = tokenizer_sub.add_parser("verify", help="check a shard folder against its manifest")
    verify.add_argument("folder", help="shard folder (holding manifest.json)")
    verify.set_defaults(func=_verify)
