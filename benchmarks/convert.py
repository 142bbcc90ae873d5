"""Cost of checkpoint conversion: export and import of the OWT-size model against safetensors alone.

The model of configs/owt-proseco.yaml (DiT 12 x 768, vocab 50258, L = 1024; 169.6 M parameters,
random weights, fp32) is saved as a one-process checkpoint holding weights and EMA, as an import
writes it. Export: `proseco convert export` of that checkpoint (digest check of the checkpoint,
DCP read of the EMA, safetensors write, tokenizer copy). Import: `proseco convert import` of the
exported folder (key and shape checks, safetensors read, DCP write of weights and EMA with their
digests). Both are compared with the bare byte-moving they contain: safetensors `load_file` of the
exported model.safetensors and `save_file` of its tensors to a new file. Every operation runs in
a fresh process, timed around the operation alone; its peak memory is the process's peak
resident set (VmHWM) minus its resident set just before. Each round runs conversion, bare, bare,
conversion (linear drift cancels) and gives one paired ratio; figures are the median over the
rounds with the interquartile range.

    python -m benchmarks.convert
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.stats import quartiles

CONFIG = "configs/owt-proseco.yaml"
VOCAB, SEQ_LEN = 50258, 1024  # GPT-2 BPE + [MASK], as the paper's OWT run
ROUNDS = 4


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(operation: str, source: str, out: str) -> None:
    """One operation in this fresh process; prints its seconds and its peak memory in MiB."""
    import torch  # noqa: F401  (imported before the baseline is read, as every operation needs it)
    from safetensors.torch import load_file, save_file

    from pretrain.convert.hf_export import export_checkpoint
    from pretrain.convert.hf_import import import_folder

    operations = {"export": lambda: export_checkpoint(source, out),
                  "import": lambda: import_folder(source, out),
                  "bare": lambda: save_file(load_file(source), out)}
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    operations[operation]()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def _measure(operation: str, source: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "benchmarks.convert", "--child", operation, str(source), str(out)],
                            capture_output=True, text=True, check=True)
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink(missing_ok=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _checkpoint(root: Path) -> tuple[Path, int]:
    """A one-process checkpoint of the OWT-size model (random weights, EMA = weights perturbed)."""
    import torch

    from pretrain.checkpoint import Checkpointer
    from pretrain.config import load_config, to_dict
    from pretrain.models import ModelShape, count_parameters, get_family
    from tokenizer.train import train_tokenizer

    cfg = load_config(CONFIG)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=VOCAB, seq_len=SEQ_LEN))
    torch.manual_seed(0)
    model = get_family(cfg.model.family).build(cfg.model, ModelShape.of(cfg.model))
    weights = {name: torch.randn_like(p) * 0.02 for name, p in model.named_parameters()}
    ema = {name: t + 1e-4 for name, t in weights.items()}
    tokenizer = train_tokenizer(None, "gpt2", root / "tokenizer")
    meta = {"config": to_dict(cfg), "has_ema": True, "ema_num_updates": 1}
    path = Checkpointer(root / "run" / "checkpoints").save(0, {"model": weights, "ema": ema}, meta,
                                                           {"tokenizer": tokenizer.folder})
    return path, count_parameters(model)


def _paired(root: Path, operation: str, source: Path, bare_source: Path) -> list[tuple[dict, dict]]:
    """Per round: (the conversion's two runs averaged, the bare operation's two runs averaged)."""
    _measure(operation, source, root / "warm")  # page cache and disk warmed up, untimed
    _measure("bare", bare_source, root / "warm.safetensors")
    rounds = []
    for _ in range(ROUNDS):
        runs = [_measure(op, src, root / f"out-{i}{'.safetensors' if op == 'bare' else ''}")
                for i, (op, src) in enumerate([(operation, source), ("bare", bare_source), ("bare", bare_source),
                                               (operation, source)])]
        mean = [{k: (a[k] + b[k]) / 2 for k in a} for a, b in ((runs[0], runs[3]), (runs[1], runs[2]))]
        rounds.append((mean[0], mean[1]))
    return rounds


def _spread(values: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range."""
    q1, median, q3 = quartiles(values)
    return median, q1, q3


def _rows(name: str, what: str, values: list[float], unit: str, setup: str, digits: int = 3) -> list[dict]:
    median, q1, q3 = _spread(values)
    spread = f"IQR {q1:.{digits}f}-{q3:.{digits}f}, min {min(values):.{digits}f}, max {max(values):.{digits}f}"
    return [{"name": name, "value": round(median, digits), "unit": unit,
             "what": f"{what}, median of {len(values)} paired rounds ({spread}); {setup}"}]


def run() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as scratch:
        root = Path(scratch)
        checkpoint, parameters = _checkpoint(root)
        exported = root / "exported"
        subprocess.run([sys.executable, "-m", "benchmarks.convert", "--child", "export", str(checkpoint),
                        str(exported)], check=True, capture_output=True)
        weights = exported / "model.safetensors"
        size = weights.stat().st_size
        exports = _paired(root, "export", checkpoint, weights)
        imports = _paired(root, "import", exported, weights)
    setup = (f"{parameters / 1e6:.1f} M parameters ({CONFIG} model, vocab {VOCAB}), fp32, model.safetensors "
             f"{size / 1e9:.2f} GB; bare = safetensors load_file + save_file of that file; one process per "
             f"operation, {ROUNDS} rounds of conversion, bare, bare, conversion")
    rows = []
    for direction, rounds in (("export", exports), ("import", imports)):
        rows += _rows(f"convert_{direction}_time_over_safetensors", f"{direction} seconds / bare seconds",
                      [c["seconds"] / b["seconds"] for c, b in rounds], "ratio", setup)
        rows += _rows(f"convert_{direction}_memory_over_safetensors", f"{direction} peak memory / bare peak memory",
                      [c["peak_mib"] / b["peak_mib"] for c, b in rounds], "ratio", setup)
        rows += _rows(f"convert_{direction}_s", f"seconds of `proseco convert {direction}`",
                      [c["seconds"] for c, _ in rounds], "s", setup, digits=2)
        rows += _rows(f"convert_{direction}_peak_mib", f"peak memory of `proseco convert {direction}` above the "
                      "process's own", [c["peak_mib"] for c, _ in rounds], "MiB", setup, digits=0)
    rows += _rows("convert_safetensors_s", "seconds of the bare safetensors read + write",
                  [b["seconds"] for _, b in exports + imports], "s", setup, digits=2)
    rows += _rows("convert_safetensors_peak_mib", "peak memory of the bare safetensors read + write",
                  [b["peak_mib"] for _, b in exports + imports], "MiB", setup, digits=0)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
    else:
        print(json.dumps(run(), indent=2))
