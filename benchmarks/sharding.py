"""Tokenizer training time and sharding throughput on the two built-in corpora.

Runs the real code on a temporary folder, as `make data` would:

- Shakespeare: BPE with 2048 pieces, then shards with L=128 (pack), 2 workers;
- MOSES: the char tokenizer, then shards with L=64 (pad), 2 workers (1.76 M samples, ~1.8 GB).

Sharding tokens/s counts the documents' tokens (train + val) over the wall time of the whole
`shard_corpus` call: reading, tokenizing, shuffling, writing and hashing the shards.

    python -m benchmarks.sharding     prints the figures as JSON
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from tokenizer.shard import shard_corpus
from tokenizer.train import train_tokenizer

CASES = (
    # name, corpus, kind, vocab_size, seq_len
    ("shakespeare", "shakespeare", "bpe", 2048, 128),
    ("moses", "moses", "char", None, 64),
)
WORKERS = 2


def run() -> list[dict]:
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sharding-bench-") as root:
        for name, corpus, kind, vocab_size, seq_len in CASES:
            start = time.perf_counter()
            tokenizer = train_tokenizer(corpus, kind, Path(root) / f"{name}-tokenizer", vocab_size)
            train_s = time.perf_counter() - start
            start = time.perf_counter()
            manifest = shard_corpus(corpus, tokenizer.folder, seq_len, Path(root) / f"{name}-shards", workers=WORKERS)
            shard_s = time.perf_counter() - start
            tokens = manifest.stats["train_tokens"] + manifest.stats["val_tokens"]
            samples = manifest.stats["train_samples"] + manifest.stats["val_samples"]
            setup = (f"{name}: {kind} tokenizer (vocab {tokenizer.vocab_size}), L={seq_len} {manifest.packing}, "
                     f"{WORKERS} workers, {tokens:,} document tokens -> {samples:,} samples")
            results += [
                {"name": f"sharding_tokens_per_s_{name}", "value": round(tokens / shard_s), "unit": "tokens/s",
                 "what": f"document tokens per second of `proseco tokenizer shard` (read, tokenize, shuffle, "
                         f"write, hash); {setup}"},
                {"name": f"sharding_s_{name}", "value": round(shard_s, 2), "unit": "s",
                 "what": f"wall time of `proseco tokenizer shard`; {setup}; target < 120 s"},
                {"name": f"tokenizer_train_s_{name}", "value": round(train_s, 2), "unit": "s",
                 "what": f"wall time of `proseco tokenizer train --kind {kind}` on {name} "
                         f"({'alphabet of both splits' if kind == 'char' else 'train split'}, "
                         f"vocab {tokenizer.vocab_size}); target < 120 s"},
            ]
            # MOSES shards take ~1.8 GB: free them before the next case.
            for path in sorted((Path(root) / f"{name}-shards").rglob("*.tar")):
                path.unlink()
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
