"""Scoring samples: which judge fits a run's corpus, and the metrics of a batch of sampled tokens.

What the documents are is read from the shard manifest (`content`, recorded by `proseco
tokenizer shard`), never guessed from the corpus name: "smiles" samples are judged by RDKit
(validity, uniqueness, novelty against the run's own training molecules, properties), "text"
samples by n-gram statistics and, when pocketsphinx is installed, the CMU trigram model. The
metrics themselves live in pretrain/quality.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain import quality
from pretrain.config import RunConfig
from pretrain.data import open_shards, open_split
from tokenizer.format import Manifest, ShardReader
from tokenizer.tokenizers import Tokenizer

REFERENCE_ROWS = 1024
"""Held-out rows the samples' bigram statistics are compared with (enough for a stable estimate
at the sample counts of a report or a sweep point, and read in well under a second)."""


def is_smiles(manifest: Manifest) -> bool:
    """Whether samples of a model trained on these shards are molecules (judged by RDKit)."""
    return manifest.content == "smiles"


def default_judge():
    """The CMU trigram judge when pocketsphinx is installed (the eval extra), else None."""
    try:
        return quality.TrigramJudge()
    except (ImportError, FileNotFoundError):  # the eval extra is not installed
        return None


@dataclass
class Scorer:
    """Turns one batch of sampled token ids into quality metrics for the run's kind of data."""

    tokenizer: Tokenizer
    smiles: bool
    training_set: set[str] | None = None  # canonical training SMILES, for novelty
    judge: object | None = None           # TrigramJudge for text (None: no perplexity)
    reference: np.ndarray | None = None   # token rows of held-out data: bigram divergence, collapse
    reference_properties: dict | None = None  # SMILES: QED, SA, ring count of held-out molecules (KS guards)
    fcd_reference: list[str] | None = None    # SMILES: held-out molecules for the FCD guard (None: no FCD)

    def texts(self, tokens: torch.Tensor) -> list[str]:
        """The decoded samples: one padded document each for SMILES, the whole sequence for text."""
        if self.smiles:  # strict: a stray PAD or mask inside a molecule makes it invalid
            return [self.tokenizer.decode_document(ids, strict=True) for ids in tokens.tolist()]
        return [self.tokenizer.decode(ids) for ids in tokens.tolist()]

    def score(self, tokens: torch.Tensor, texts: list[str] | None = None) -> dict:
        """Metrics of a batch; `texts` are its decoded samples when the caller already has them."""
        texts = self.texts(tokens) if texts is None else texts
        if self.smiles:
            metrics = quality.smiles_metrics(texts, self.training_set, with_properties=True,
                                             reference=self.reference_properties)
            # Valid, unique and novel molecules per sample drawn (the paper's QM9 x-axis, normalised).
            metrics["vun"] = metrics.get("n_novel", metrics["n_unique"]) / max(len(texts), 1)
            if self.fcd_reference is not None:
                metrics["fcd"] = _fcd_or_nan(texts, self.fcd_reference)
        else:
            metrics = quality.text_metrics(texts, token_ids=tokens.tolist(), judge=self.judge)
        metrics["masked_left"] = float((tokens == self.tokenizer.mask_id).float().mean())
        if self.reference is not None:
            ids = tokens.tolist()
            metrics["bigram_js"] = quality.bigram_divergence(ids, self.reference)
            metrics["collapsed"] = quality.is_collapsed(quality.unigram_entropy(ids),
                                                        quality.unigram_entropy(self.reference))
        return metrics


def _fcd_or_nan(samples: list[str], reference: list[str]) -> float:
    """FCD of the valid samples to the reference; nan when fewer than 2 samples are valid."""
    try:
        return quality.fcd_score(samples, reference)
    except ValueError:
        return float("nan")


def split_documents(shards: str | Path, split: str = "train", purpose: str = "novelty") -> list[str | None]:
    """The document of every sample of a split of a padded shard folder, in manifest order (None
    for an unreadable sample)."""
    manifest, tokenizer = open_shards(shards)
    if manifest.packing != "pad":
        raise ValueError(f"{shards} is packed: documents are cut across samples, so {purpose} needs --packing pad")
    _, opened = open_split(shards, split)
    documents: list[str | None] = []
    for info, count in zip(opened.infos, opened.counts):
        tokens, ok = ShardReader(opened.store, info, opened.geometry).read(0, count)
        documents += [tokenizer.decode_document(row) if good else None for row, good in zip(tokens.tolist(), ok)]
    return documents


def training_documents(shards: str | Path) -> list[str]:
    """Every readable document of the train split of a padded shard folder (one per sample), decoded."""
    return [document for document in split_documents(shards, "train") if document is not None]


def reference_rows(shards: str | Path, split: str = "val", limit: int = REFERENCE_ROWS) -> np.ndarray:
    """Up to `limit` readable token rows of a split (in manifest order): what samples are compared with."""
    _, shards_of_split = open_split(shards, split)
    rows = []
    for info, count in zip(shards_of_split.infos, shards_of_split.counts):
        tokens, ok = ShardReader(shards_of_split.store, info, shards_of_split.geometry).read(0, count)
        rows.append(tokens[ok])
        if sum(len(r) for r in rows) >= limit:
            break
    return np.concatenate(rows)[:limit]


def build_scorer(cfg: RunConfig, tokenizer: Tokenizer, run_dir: Path, shards: str | Path | None = None,
                 novelty: bool = True, log: Callable[[str], None] = print, fcd: bool = False) -> Scorer:
    """The scorer for the content of the run's shards (`shards`, default data.shards): SMILES
    metrics, with `novelty` against the run's own training molecules (canonicalised once and
    cached in run_dir/cache), or text metrics with the trigram judge. `fcd` adds the Frechet
    ChemNet Distance to the held-out molecules (the optional fcd package, about 25 s per 1,024
    samples on 2 cores; biased upwards below a few thousand, so compare equal sample counts)."""
    shards = shards or cfg.data.shards
    manifest, _ = open_shards(shards)
    reference = reference_rows(shards, "val" if "val" in manifest.splits else "train")
    if not is_smiles(manifest):
        judge = default_judge()
        if judge is None:
            log("warning: pocketsphinx is not installed (pip install -e .[eval]): no trigram perplexity")
        return Scorer(tokenizer, smiles=False, judge=judge, reference=reference)
    training_set = None
    if novelty:
        started = time.perf_counter()
        training_set = quality.canonical_set_cached(training_documents(shards), run_dir / "cache")
        log(f"training set: {len(training_set)} canonical molecules ({time.perf_counter() - started:.1f} s)")
    # Held-out molecules' properties, for the KS guards beside vun (about 2 s for 1,024 molecules).
    held_out_smiles = [tokenizer.decode_document(row, strict=True) for row in reference.tolist()]
    held_out = quality.property_values(held_out_smiles)
    if fcd:
        quality.require_fcd()  # fail now rather than after the sampling
    return Scorer(tokenizer, smiles=True, training_set=training_set, reference=reference,
                  fcd_reference=held_out_smiles if fcd else None,
                  reference_properties=held_out)
