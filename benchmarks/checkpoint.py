"""Cost of checkpoint digests: saving and loading the OWT-size model with and without them.

The training state of configs/owt-proseco.yaml's model (DiT 12 x 768, vocab 50258, L = 1024;
weights, EMA and both AdamW moments, fp32) is saved and loaded on one process. Save: a
Checkpointer save (DCP writes, SHA-256 of every file, manifest, rename, rotation) against a bare
dcp.save of the same state into a new folder, the previous one then removed (what a save cost
before digests). Load: a Checkpointer load with checkpoint.verify=digest against verify=size
(sizes and DCP metadata only). Each round runs with, without, without, with, so that drift hits
both alike, and gives one paired ratio (with - without) / without, reported as median, min and
max; the save rounds all come before the load rounds. The hashing pass alone is also timed (the
files in the page cache, as when a save hashes them), against the bare save of the same round
number: the save's overhead without the disk's noise.

    python -m benchmarks.checkpoint
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from pretrain.checkpoint import Checkpointer, app_state
from pretrain.checkpoint.safe import dcp_quietly
from pretrain.config import load_config
from pretrain.files import file_sha256
from pretrain.models import ModelShape, count_parameters, get_family
from pretrain.optim import EMA, build_optimizer

CONFIG = "configs/owt-proseco.yaml"
VOCAB, SEQ_LEN = 50258, 1024  # GPT-2 BPE + [MASK], as the paper's OWT run
ROUNDS = 4  # a save round writes the ~2.7 GB state four times, a load round reads it four times
META = {"has_ema": True}  # else a load drops the EMA from the state (as for a run without EMA)


def _state() -> tuple[dict, int]:
    """The model's full training state (as a run saves it) and its parameter count."""
    cfg = load_config(CONFIG)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=VOCAB, seq_len=SEQ_LEN)
    model = get_family(model_cfg.family).build(model_cfg, ModelShape.of(model_cfg))
    optimizer = build_optimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates both AdamW moments
    ema = EMA([model], cfg.optim.ema_decay)
    return app_state([model], [optimizer], ema.shadow), count_parameters(model)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bare_save(state: dict, root: Path, step: int) -> None:
    """What a save cost before digests: dcp.save into a new folder, then the previous one removed
    (as the checkpointer rotates; writing next to the old one, not over it, matters on disks that
    allocate lazily)."""
    with dcp_quietly():
        dcp.save(state, checkpoint_id=str(root / f"bare_{step}"), no_dist=True)
    shutil.rmtree(root / f"bare_{step - 1}", ignore_errors=True)


def _abba(with_digests, without) -> tuple[float, float]:
    """Seconds of with, without, without, with (linear drift cancels): (both withs, both withouts)."""
    times = [_timed(fn) for fn in (with_digests, without, without, with_digests)]
    return times[0] + times[3], times[1] + times[2]


def _paired(pairs: list[tuple[float, float]]) -> list[float]:
    return sorted((with_ - without) / without for with_, without in pairs)


def _rows(name: str, what: str, ratios: list[float], setup: str) -> list[dict]:
    """Median, min and max of per-round ratios, as three figures."""
    ratios = sorted(ratios)
    spread = f"min {ratios[0]:.3f}, max {ratios[-1]:.3f} over {len(ratios)} rounds"
    return [{"name": name, "value": round(statistics.median(ratios), 3), "unit": "ratio",
             "what": f"{what}, median ({spread}); {setup}"},
            {"name": f"{name}_min", "value": round(ratios[0], 3), "unit": "ratio", "what": f"{what}, min; {setup}"},
            {"name": f"{name}_max", "value": round(ratios[-1], 3), "unit": "ratio", "what": f"{what}, max; {setup}"}]


def _digest_pass(folder: Path) -> float:
    """Seconds to hash every file of a checkpoint just written (what a save adds, without the
    disk's noise: the files are in the page cache, as they are when the save hashes them)."""
    return _timed(lambda: [file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()])


def run() -> list[dict]:
    torch.manual_seed(0)
    state, parameters = _state()
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as scratch:
        root = Path(scratch)
        checkpointer = Checkpointer(root / "checkpoints", keep_last=1)
        steps, bare_steps, written = itertools.count(), itertools.count(), []

        def save_with_digests() -> None:
            written.append(checkpointer.save(next(steps), state, META))

        def save_bare() -> None:
            _bare_save(state, root, next(bare_steps))

        # Saves first, then loads: on this machine a write right after heavy reading runs up to
        # 3x slower, which would always hit whichever save comes first after the loads.
        save_with_digests(), save_bare()  # warm the disk and the page cache up, untimed
        saves = [_abba(save_with_digests, save_bare) for _ in range(ROUNDS)]
        saved = written[-1]
        passes, loads = [], []
        for _ in range(ROUNDS):
            passes.append(_digest_pass(saved))
            loads.append(_abba(partial(Checkpointer.load, saved, state, verify="digest"),
                               partial(Checkpointer.load, saved, state, verify="size")))
        size = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    setup = (f"{parameters / 1e6:.0f} M parameters ({CONFIG} model, vocab {VOCAB}), weights + EMA + AdamW moments "
             f"in fp32 = {size / 1e9:.2f} GB, one process, {ROUNDS} rounds")
    return [
        *_rows("checkpoint_digest_save_overhead", "(save with digests - bare save) / bare save, paired rounds",
               _paired(saves), setup),
        *_rows("checkpoint_digest_load_overhead", "(load with verify=digest - verify=size) / verify=size, paired "
               "rounds", _paired(loads), setup),
        *_rows("checkpoint_digest_pass_over_save", "seconds to hash the saved files (page cache) / the bare save "
               "of the same round", [d / (off / 2) for d, (_, off) in zip(passes, saves)], setup),
        {"name": "checkpoint_save_s", "value": round(statistics.median(off / 2 for _, off in saves), 2), "unit": "s",
         "what": f"bare dcp.save of the state (fsync'd) and removal of the previous one, median; {setup}"},
        {"name": "checkpoint_load_s", "value": round(statistics.median(off / 2 for _, off in loads), 2), "unit": "s",
         "what": f"Checkpointer.load with checkpoint.verify=size, median; {setup}"},
        {"name": "checkpoint_sha256_gb_per_s", "value": round(size / statistics.median(passes) / 1e9, 2),
         "unit": "GB/s", "what": f"SHA-256 of every file of the checkpoint (page cache), one thread, median; {setup}"},
    ]


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
