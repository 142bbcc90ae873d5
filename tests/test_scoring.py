"""The judge of samples follows the content recorded in the shard manifest, not the corpus name."""

import importlib.util
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.scoring import build_scorer
from tests.helpers import write_smiles_lines
from tokenizer.shard import shard_corpus
from tokenizer.tokenizers import load_tokenizer
from tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """SMILES-like lines in a file whose name says "moses", and a char tokenizer for them."""
    root = tmp_path_factory.mktemp("scoring")
    path = write_smiles_lines(root / "moses.txt", 60)
    train_tokenizer(str(path), "char", root / "tok", line_documents=True)
    return path, root / "tok"


def scorer_for(corpus: tuple[Path, Path], out: Path, **shard_options):
    path, tok = corpus
    shard_corpus(str(path), tok, seq_len=24, out=out, packing="pad", workers=1, val_fraction=0.1,
                 line_documents=True, **shard_options)
    cfg = load_config(None, [f"data.shards={out}"])
    tokenizer = load_tokenizer(tok)
    return build_scorer(cfg, tokenizer, out.parent / "run", novelty=False, log=lambda message: None), tokenizer


def test_a_corpus_named_moses_with_text_content_is_scored_as_text(corpus, tmp_path):
    scorer, tokenizer = scorer_for(corpus, tmp_path / "shards")
    assert not scorer.smiles
    tokens = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("CCO"), tokenizer.eos_id]])
    metrics = scorer.score(tokens)
    assert "unigram_entropy" in metrics and "validity" not in metrics


@pytest.mark.skipif(importlib.util.find_spec("rdkit") is None, reason="needs rdkit (pip install -e .[eval])")
def test_smiles_content_is_scored_with_the_smiles_judge(corpus, tmp_path):
    scorer, tokenizer = scorer_for(corpus, tmp_path / "shards", content="smiles")
    assert scorer.smiles and scorer.judge is None and scorer.training_set is None
    tokens = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("CCO"), tokenizer.eos_id]])
    metrics = scorer.score(tokens)
    assert metrics["validity"] == 1.0 and metrics["vun"] == 1.0 and "unigram_entropy" not in metrics
