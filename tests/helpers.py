"""Shared test fixtures: a tiny real corpus, tokenizer and shard folder; torchrun launches."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from tokenizer.shard import shard_corpus
from tokenizer.train import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FRAGMENTS = ["C", "CC", "CCC", "O", "N", "C(=O)", "c1ccccc1", "C(C)", "CO", "CN", "Cl", "F"]
WORDS = "the a king queen sword crown night day love war speaks runs falls sleeps red old young".split()


def make_word_shards(root: Path, seq_len: int = 32, documents: int = 120) -> Path:
    """Word salad with some structure, char-tokenized and packed into `seq_len`-token samples."""
    rng = random.Random(0)
    docs = root / "docs"
    docs.mkdir(parents=True)
    for i in range(documents):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        (docs / f"{i:03d}.txt").write_text(sentence + ".")
    train_tokenizer(str(docs), "char", root / "tok")
    shard_corpus(str(docs), root / "tok", seq_len=seq_len, out=root / "shards", packing="pack", samples_per_shard=40,
                 workers=1, val_fraction=0.1)
    return root / "shards"


def write_smiles_lines(path: Path, lines: int) -> Path:
    """SMILES-like lines (one to three fragments each; most, not all, valid molecules)."""
    rng = random.Random(0)
    path.write_text("\n".join("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 3)))
                              for _ in range(lines)) + "\n")
    return path


# DeepSpeed compiles a shared-memory communication op on a machine's first CPU run (~30-70 s); every
# test launch shares this cache, so the suite pays for it once per machine.
TORCH_EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/proseco-torch-extensions")


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a multi-process launch: one thread per process, this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS,
            **extra}


def torchrun(nproc: int, script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` under torchrun on CPU/gloo; fails the test with the workers' output on error."""
    env = launch_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise AssertionError(f"torchrun {script} {args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
