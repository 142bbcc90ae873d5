"""Streamed shards: bytes per token of the compact (v2) and v1 formats, the loader reading over HTTP
with added latency against local files, and sharding a Parquet corpus per core.

- Bytes per token: whole shard folders of random uint16 tokens (8 full shards of 4096 samples and
  a partial one), on disk bytes / raw token bytes, for L in {32, 128, 1024}.
- HTTP: a local aiohttp server (Range requests, FileResponse) sleeping 0, 10 or 50 ms before each
  answer, in its own process; `TrainLoader` with 1 worker and data.prefetch=64 reads a v2 folder
  of 16 shards at L=1024 by URL, against the same folder read locally, in paired interleaved
  rounds (median and IQR of the ratios): raw (the loader as fast as it goes) and paced (a 2 ms
  step per micro-batch, what prefetch must hide). It also counts the requests per read.
- Sharding: `proseco tokenizer shard` (pack, L=1024, a 4,096-piece BPE) on a generated Parquet
  corpus of 1 GiB of text (PROSECO_BENCH_PARQUET_MB to change it), 1 and 2 worker processes, interleaved
  rounds; tokens/s, tokens/s per worker, the 2/1 speedup, and the share of the time the main
  process spends reading (what more workers cannot shorten).

    python -m benchmarks.streaming            prints the figures as JSON
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.stats import quartiles
from pretrain.data import TrainLoader
from pretrain.data.shards import _remote_sha256_cached, _sha256_cached
from tokenizer.format import FORMAT_V2, Geometry, Manifest, ShardInfo, SplitInfo, shard_bytes, write_manifest
from tokenizer.storage import ReadPolicy

SEQ_LENS = (32, 128, 1024)
SAMPLES_PER_SHARD = 4096
LATENCIES_MS = (0, 10, 50)
ROUNDS = 3
HTTP_SEQ_LEN, HTTP_SHARDS, HTTP_MICRO, HTTP_ITEMS, WARM_ITEMS = 1024, 16, 8, 1000, 20
HTTP_WORKERS, HTTP_PREFETCH = 1, 64
STEP_S = 0.002
PARQUET_MB = int(os.environ.get("PROSECO_BENCH_PARQUET_MB", 1024))  # the issue's >= 1 GB; smaller for a quick look
SHARD_ROUNDS = 2


# ---------------------------------------------------------------------------------------------
# Bytes per token


def folder_bytes(seq_len: int, blocked: bool, shards: int = 8, tail: int = 1000) -> tuple[int, int]:
    """(shard bytes on disk, raw token bytes) of a split of `shards` full shards and a partial one."""
    rng = np.random.default_rng(seq_len)
    block = max(1, (1 << 20) // (seq_len * 2)) if blocked else 1
    geometry = Geometry(seq_len, "uint16", block, blocked)
    total = raw = 0
    for index, count in enumerate([SAMPLES_PER_SHARD] * shards + [tail]):
        samples = rng.integers(0, 50_000, size=(count, seq_len), dtype=np.uint16)
        total += len(shard_bytes(samples, index * SAMPLES_PER_SHARD, geometry))
        raw += samples.nbytes
    return total, raw


def bytes_per_token() -> list[dict]:
    rows = []
    for seq_len in SEQ_LENS:
        for blocked, name in ((True, "v2"), (False, "v1")):
            total, raw = folder_bytes(seq_len, blocked)
            rows.append({"name": f"shard_bytes_per_raw_byte_{name}_L{seq_len}", "value": round(total / raw, 4),
                         "unit": "ratio", "what": f"on-disk bytes / raw uint16 token bytes, proseco-shards-{name}, "
                         f"L={seq_len}, 8 shards of {SAMPLES_PER_SHARD} samples + one of 1000"
                         + ("; target < 1.01" if blocked else "") + f" ({total / raw * 2:.3f} bytes per token)"})
    return rows


# ---------------------------------------------------------------------------------------------
# HTTP with added latency


def serve(root: str, port: int, delay_ms: float) -> None:
    """A static file server that answers Range requests after `delay_ms`; GET /_count tells how
    many file requests it has answered."""
    import asyncio

    from aiohttp import web

    count = {"requests": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/_count":
            return web.json_response(count)
        count["requests"] += 1
        await asyncio.sleep(delay_ms / 1000)
        path = Path(root) / request.path.lstrip("/")
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(root: Path, delay_ms: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.streaming", "serve", str(root), str(port),
                                str(delay_ms)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("the benchmark's HTTP server did not start") from None
            time.sleep(0.05)


def _requests(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{url}/_count") as answer:
        return json.loads(answer.read())["requests"]


def build_folder(root: Path) -> Path:
    folder = root / "shards"
    rng = np.random.default_rng(0)
    block = (1 << 20) // (HTTP_SEQ_LEN * 2)
    geometry = Geometry(HTTP_SEQ_LEN, "uint16", block, True)
    split = SplitInfo()
    (folder / "train").mkdir(parents=True)
    for index in range(HTTP_SHARDS):
        samples = rng.integers(0, 50_000, size=(SAMPLES_PER_SHARD, HTTP_SEQ_LEN), dtype=np.uint16)
        body = shard_bytes(samples, index * SAMPLES_PER_SHARD, geometry)
        relative = f"train/shard-{index:06d}.tar"
        (folder / relative).write_bytes(body)
        split.shards.append(ShardInfo(relative, SAMPLES_PER_SHARD, index * SAMPLES_PER_SHARD, len(body),
                                      hashlib.sha256(body).hexdigest()))
        split.samples += SAMPLES_PER_SHARD
    write_manifest(folder, Manifest(seq_len=HTTP_SEQ_LEN, dtype="uint16", packing="pack", corpus="benchmark",
                                    tokenizer_sha256="benchmark", vocab_size=50_000, splits={"train": split},
                                    format=FORMAT_V2, block_samples=block))
    return folder


def loader_rate(where: str | Path, seed: int, step_s: float = 0.0) -> float:
    """Tokens/s of one rank's loader over HTTP_ITEMS micro-batches after the first WARM_ITEMS
    (steady state: worker start-up and the first digests are not counted), with a consumer that
    spends `step_s` on each micro-batch (a training step; 0: as fast as the loader goes)."""
    _sha256_cached.cache_clear()
    _remote_sha256_cached.cache_clear()
    loader = TrainLoader(where, global_batch_size=HTTP_MICRO * 8, micro_batch_size=HTTP_MICRO,
                         num_workers=HTTP_WORKERS, seed=seed, prefetch=HTTP_PREFETCH,
                         read_policy=ReadPolicy(timeout_s=30, retries=2, backoff_s=0.1))
    iterator = iter(loader)
    for _ in range(WARM_ITEMS):
        next(iterator)
    start = time.perf_counter()
    tokens = 0
    for _ in range(HTTP_ITEMS):
        tokens += next(iterator)["tokens"].numel()
        if step_s:
            time.sleep(step_s)
    elapsed = time.perf_counter() - start
    iterator.close()
    return tokens / elapsed


def http_latency(root: Path) -> list[dict]:
    folder = build_folder(root)
    modes = {"raw": 0.0, "paced": STEP_S}
    loader_rate(folder, 0)  # page cache warm for every round
    ratios = {(mode, delay): [] for mode in modes for delay in LATENCIES_MS}
    local_rates: dict[str, list[float]] = {mode: [] for mode in modes}
    requests = {}
    for round_index in range(ROUNDS):
        for mode, step_s in modes.items():
            local = loader_rate(folder, round_index, step_s)
            local_rates[mode].append(local)
            for delay in LATENCIES_MS:
                # A fresh server per measurement: one whose client went away mid-answer has stalled
                # the next client's first request until its timeout (aiohttp, seen here).
                process, url = _start_server(folder.parent, delay)
                try:
                    ratios[mode, delay].append(loader_rate(f"{url}/shards", round_index, step_s) / local)
                    requests[delay] = _requests(url)
                finally:
                    process.terminate()
                    process.wait()
    setup = (f"TrainLoader, {HTTP_WORKERS} worker, prefetch {HTTP_PREFETCH}, micro-batch {HTTP_MICRO} x "
             f"L={HTTP_SEQ_LEN} uint16, {HTTP_ITEMS} micro-batches after {WARM_ITEMS}, {HTTP_SHARDS} v2 shards of "
             f"{SAMPLES_PER_SHARD} samples, shard digests on, server and loader on the same {os.cpu_count()} "
             f"shared cores; {ROUNDS} interleaved rounds")
    rows = []
    for mode, step_s in modes.items():
        consumer = (f"a consumer spending {step_s * 1000:.0f} ms per micro-batch (a training step at "
                    f"{HTTP_MICRO * HTTP_SEQ_LEN / step_s / 1e6:.1f} M tokens/s)" if step_s
                    else "a consumer that takes micro-batches as fast as they come")
        rows.append({"name": f"loader_local_tokens_per_s_L1024_{mode}", "value": round(statistics.median(
                     local_rates[mode])), "unit": "tokens/s",
                     "what": f"the local-files baseline of the ratios below, median, {consumer}; {setup}"})
        for delay in LATENCIES_MS:
            q1, median, q3 = quartiles(ratios[mode, delay])
            rows.append({"name": f"loader_http_over_local_{mode}_{delay}ms", "value": round(median, 3),
                         "unit": "ratio", "what": f"tokens/s over HTTP with {delay} ms added per request / local "
                         f"files, median (IQR {q1:.3f}-{q3:.3f}), {consumer}; {setup}"
                         + ("; target >= 0.9" if delay == 50 else "")})
    rows.append({"name": "loader_http_requests_per_read", "value": round(requests[0] / (HTTP_ITEMS + WARM_ITEMS), 3),
                 "unit": "requests", "what": f"HTTP requests the server answered per micro-batch read (the "
                 f"manifest, size checks, 8 MiB digest ranges and prefetched reads included), last paced "
                 f"round at 0 ms; {setup}"})
    return rows


# ---------------------------------------------------------------------------------------------
# Sharding a Parquet corpus


def write_parquet(path: Path, megabytes: int) -> int:
    """Word-salad documents of 500-5,000 characters in a Parquet file; returns its characters."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "the", "and", "ing", "er", "qu", "on", "st"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    writer, chars = None, 0
    while chars < megabytes << 20:
        docs = [" ".join(rng.choices(words, k=rng.randint(100, 1000))) + "." for _ in range(2000)]
        chars += sum(map(len, docs))
        table = pa.table({"text": docs})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return chars


def _read_seconds(corpus: str) -> float:
    """Time the main process of a sharding run spends reading documents alone (both splits, as
    run_task reads them): the serial part that more workers cannot shorten."""
    from tokenizer.corpora import SPLITS, iter_documents

    start = time.perf_counter()
    for split in SPLITS:
        for _ in iter_documents(corpus, split, val_fraction=0.001):
            pass
    return time.perf_counter() - start


def sharding(root: Path) -> list[dict]:
    from tokenizer.shard import shard_corpus
    from tokenizer.train import train_tokenizer

    corpus = root / "corpus.parquet"
    chars = write_parquet(corpus, PARQUET_MB)
    size = corpus.stat().st_size
    tokenizer = train_tokenizer(str(corpus), "bpe", root / "tok", 4096, max_train_chars=20 << 20)
    seconds: dict[int, list[float]] = {1: [], 2: []}
    tokens = 0
    for round_index in range(SHARD_ROUNDS):
        order = list(seconds) if round_index % 2 == 0 else list(seconds)[::-1]
        for workers in order:
            out = root / f"out-{workers}-{round_index}"
            start = time.perf_counter()
            manifest = shard_corpus(str(corpus), tokenizer.folder, 1024, out, workers=workers, val_fraction=0.001)
            seconds[workers].append(time.perf_counter() - start)
            tokens = manifest.stats["train_tokens"] + manifest.stats["val_tokens"]
            for path in out.rglob("*.tar"):
                path.unlink()
    read_share = _read_seconds(str(corpus)) / statistics.median(seconds[1])
    setup = (f"`proseco tokenizer shard` (read, tokenize, pack, shuffle, write v2, hash) of a Parquet corpus of "
             f"{size / 1e6:,.0f} MB ({chars / 1e6:,.0f} M characters, {tokens / 1e6:,.1f} M tokens), BPE 4096, "
             f"L=1024 pack, {SHARD_ROUNDS} interleaved rounds (order alternated) on {os.cpu_count()} cores")
    rows = []
    for workers, values in seconds.items():
        q1, median, q3 = quartiles([tokens / s for s in values])
        rows.append({"name": f"sharding_parquet_tokens_per_s_{workers}_workers", "value": round(median),
                     "unit": "tokens/s", "what": f"median (IQR {q1:,.0f}-{q3:,.0f}); {setup}"})
        rows.append({"name": f"sharding_parquet_tokens_per_s_per_core_{workers}_workers",
                     "value": round(median / workers), "unit": "tokens/s",
                     "what": f"the above / {workers} (the main process, which reads and writes, runs beside them)"})
    speedups = [one / two for one, two in zip(seconds[1], seconds[2])]
    q1, median, q3 = quartiles(speedups)
    rows.append({"name": "sharding_parquet_speedup_2_over_1_workers", "value": round(median, 3), "unit": "ratio",
                 "what": f"1-worker time / 2-worker time per round, median (IQR {q1:.3f}-{q3:.3f}); {setup}"})
    rows.append({"name": "sharding_parquet_read_share", "value": round(read_share, 3), "unit": "ratio",
                 "what": "time to read the documents alone (both splits, in the main process) / a 1-worker run: "
                         "the serial part, with the chunk finishing, that caps what more workers per task give "
                         f"(run more tasks, --num-tasks, beyond); {setup}"})
    return rows


def run() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="streaming-bench-") as root:
        rows = bytes_per_token()
        rows += http_latency(Path(root) / "http")
        rows += sharding(Path(root))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        print(json.dumps(run(), indent=2))
