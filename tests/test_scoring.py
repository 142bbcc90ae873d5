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


@pytest.mark.skipif(importlib.util.find_spec("fcd") is None, reason="needs fcd (pip install -e .[eval])")
def test_the_fcd_guard_scores_samples_against_the_held_out_molecules(corpus, tmp_path):
    path, tok = corpus
    out = tmp_path / "shards"
    shard_corpus(str(path), tok, seq_len=24, out=out, packing="pad", workers=1, val_fraction=0.5,
                 line_documents=True, content="smiles")
    tokenizer = load_tokenizer(tok)
    scorer = build_scorer(load_config(None, [f"data.shards={out}"]), tokenizer, tmp_path / "run", novelty=False,
                          log=lambda message: None, fcd=True)
    held_out = torch.tensor(scorer.reference)
    same, other = scorer.score(held_out)["fcd"], scorer.score(torch.roll(held_out, 1, dims=1))["fcd"]
    assert abs(same) < 1e-3  # the reference against itself (sqrtm rounding: a hair below 0 too)
    assert not other == other or other > same  # rolled rows: mostly invalid (nan below 2 valid), else further
    one_valid = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("CCO"), tokenizer.eos_id]])
    assert scorer.score(one_valid)["fcd"] != scorer.score(one_valid)["fcd"]  # nan: FCD needs 2 valid molecules


@pytest.mark.skipif(importlib.util.find_spec("rdkit") is None, reason="needs rdkit (pip install -e .[eval])")
def test_label_shards_marks_the_molecules_above_the_train_quantile(corpus, tmp_path):
    import numpy as np

    from pretrain import quality
    from pretrain.data.labels import open_labels
    from pretrain.data.shards import open_split
    from pretrain.errors import UserError
    from pretrain.labeling import label_shards
    from pretrain.scoring import split_documents

    path, tok = corpus
    out = tmp_path / "shards"
    shard_corpus(str(path), tok, seq_len=24, out=out, packing="pad", workers=1, val_fraction=0.2,
                 line_documents=True, content="smiles")
    info = label_shards(out, "ring_count", quantile=0.5)
    rings = {split: [quality.property_of(s, "ring_count") for s in split_documents(out, split)]
             for split in ("train", "val")}
    valid_train = [r for r in rings["train"] if r == r]
    assert info["threshold"] == pytest.approx(float(np.quantile(valid_train, 0.5)))
    for split in ("train", "val"):
        manifest, shards = open_split(out, split)
        labels = open_labels(out, "ring_count", split, shards.counts, manifest.fingerprint)
        expected = [int(r == r and r > info["threshold"]) for r in rings[split]]
        assert labels.values.tolist() == expected and info["splits"][split]["positive"] == sum(expected)
    with pytest.raises(UserError, match="--overwrite"):
        label_shards(out, "ring_count")
    text = tmp_path / "text"
    shard_corpus(str(path), tok, seq_len=24, out=text, packing="pad", workers=1, val_fraction=0.2,
                 line_documents=True)
    with pytest.raises(UserError, match="not molecules"):
        label_shards(text, "qed")
