"""Sample quality with external judges: RDKit for SMILES, the CMU trigram model for English text.

Every metric returns plain floats and ints (in a dict where there are several), so results go
straight into JSON lines and markdown tables. A metric that is undefined for its input (a mean
over no molecules, a perplexity over no words) is ``nan``; MetricsLogger writes those as null.

RDKit and pocketsphinx are imported inside the functions that need them (``pip install -e .[eval]``),
so importing this module stays cheap.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pretrain.files import atomic_path

EVAL_EXTRA = "pip install -e .[eval]"

# --------------------------------------------------------------------------------------------------
# SMILES
# --------------------------------------------------------------------------------------------------

# Below this many SMILES a process pool costs more than it saves (~0.3 ms per SMILES serially).
_PARALLEL_MIN_SMILES = 100_000
_CANONICAL_CHUNK = 20_000


@cache
def _rdkit() -> tuple[ModuleType, ModuleType]:
    """(Chem, QED) with RDKit's logging off: invalid samples would otherwise print one error each."""
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import QED
    except ImportError as err:
        raise ImportError(f"SMILES metrics need RDKit: {EVAL_EXTRA} (or pip install rdkit)") from err
    RDLogger.DisableLog("rdApp.*")
    return Chem, QED


@cache
def _sascorer() -> ModuleType:
    """The synthetic accessibility scorer (Ertl & Schuffenhauer 2009) shipped in RDKit's Contrib."""
    from rdkit import RDConfig

    path = Path(RDConfig.RDContribDir) / "SA_Score" / "sascorer.py"
    if not path.is_file():
        raise ImportError(f"RDKit's Contrib SA_Score is missing ({path}); reinstall rdkit from the rdkit wheel")
    spec = importlib.util.spec_from_file_location("sascorer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.readFragmentScores()  # load the fragment table once, not on the first scored molecule
    return module


def _parse(smiles: str) -> Any | None:
    """The sanitised RDKit molecule of one SMILES, or None when it is not a valid molecule.

    Surrounding whitespace is ignored. Inner whitespace makes a sample invalid: RDKit would read the
    text after it as the molecule's name and accept e.g. "CCO garbage" as ethanol. The empty string
    is invalid, although RDKit parses it to a molecule with no atoms.
    """
    Chem, _ = _rdkit()
    smiles = smiles.strip()
    if not smiles or any(ch.isspace() for ch in smiles):
        return None
    return Chem.MolFromSmiles(smiles)


def canonical_smiles(smiles: str) -> str | None:
    """RDKit's canonical (isomeric) SMILES of one SMILES, or None when it is invalid."""
    mol = _parse(smiles)
    return None if mol is None else _rdkit()[0].MolToSmiles(mol)


def _canonical_chunk(smiles: list[str]) -> list[str]:
    # Runs in pool workers: top-level so it pickles; _rdkit() silences logging in each worker.
    return [c for c in map(canonical_smiles, smiles) if c is not None]


def _default_processes(n_smiles: int) -> int:
    if n_smiles < _PARALLEL_MIN_SMILES:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def canonical_set(smiles: Iterable[str], *, processes: int | None = None) -> set[str]:
    """Canonical SMILES of every valid input; invalid inputs are dropped.

    RDKit parsing and sanitising dominate (~0.3 ms per MOSES SMILES on one core here), so large
    inputs are split over ``processes`` worker processes; None uses every available core for
    100k SMILES or more and one process below. For a training set reused across evaluations, use
    canonical_set_cached.
    """
    items = list(smiles)
    processes = _default_processes(len(items)) if processes is None else processes
    if processes <= 1:
        return set(_canonical_chunk(items))
    chunks = [items[i:i + _CANONICAL_CHUNK] for i in range(0, len(items), _CANONICAL_CHUNK)]
    # fork starts workers in milliseconds and does not re-import the caller's __main__ (spawn
    # would, and break unguarded scripts); the workers only run RDKit, never torch.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    result: set[str] = set()
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method)) as pool:
        for canonical in pool.map(_canonical_chunk, chunks):
            result.update(canonical)
    return result


def _input_fingerprint(items: list[str]) -> str:
    """sha256 of the RDKit version and the input, in order: canonical forms change across RDKit
    releases, so a cache written by another version must not be reused."""
    from rdkit import __version__ as rdkit_version

    digest = hashlib.sha256(f"rdkit {rdkit_version}\n".encode())
    for start in range(0, len(items), 100_000):
        digest.update("\n".join(items[start:start + 100_000]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def canonical_set_cached(smiles: Iterable[str], cache_dir: str | os.PathLike, *,
                         processes: int | None = None) -> set[str]:
    """canonical_set, cached in ``cache_dir/canonical-smiles-<hash>.txt.gz``.

    The hash covers the input SMILES in order and the RDKit version, so a changed training set or
    RDKit release gets a new file. The file is written to a temporary name and renamed, so a crash
    or a concurrent writer never leaves a truncated cache behind.
    """
    items = list(smiles)
    path = Path(cache_dir) / f"canonical-smiles-{_input_fingerprint(items)[:20]}.txt.gz"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            return set(lines.read().splitlines())
    result = canonical_set(items, processes=processes)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial, gzip.open(partial, "wt", encoding="utf-8", compresslevel=1) as out:
        out.write("\n".join(sorted(result)))
    return result


def _molecule_properties(mol: Any) -> tuple[float, float, int]:
    """(QED, SA score, ring count) of one molecule: the paper's QM9 properties plus SA."""
    _, QED = _rdkit()
    return float(QED.qed(mol)), float(_sascorer().calculateScore(mol)), int(mol.GetRingInfo().NumRings())


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


PROPERTIES = ("qed", "sa", "ring_count")
"""The molecule properties scored (`_molecule_properties`), in its order."""


def ks_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical
    CDFs, from 0 (same distribution) to 1 (disjoint); nan when either side is empty."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if not len(a) or not len(b):
        return math.nan
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def property_of(smiles: str, name: str) -> float:
    """One property of PROPERTIES of one molecule (only that one is computed); nan when invalid."""
    mol = _parse(smiles)
    if mol is None:
        return math.nan
    if name == "qed":
        return float(_rdkit()[1].qed(mol))
    if name == "sa":
        return float(_sascorer().calculateScore(mol))
    if name == "ring_count":
        return float(mol.GetRingInfo().NumRings())
    raise ValueError(f"unknown property {name!r}: one of {PROPERTIES}")


def property_values(smiles: Iterable[str]) -> dict[str, list[float]]:
    """QED, SA and ring count of every valid molecule among `smiles` (duplicates included): the
    held-out reference that samples' property distributions are compared with."""
    values: dict[str, list[float]] = {name: [] for name in PROPERTIES}
    for text in smiles:
        mol = _parse(text)
        if mol is not None:
            for name, value in zip(PROPERTIES, _molecule_properties(mol)):
                values[name].append(value)
    return values


def smiles_metrics(samples: list[str], training_set: set[str] | None = None, *, with_properties: bool = True,
                   reference: dict[str, Sequence[float]] | None = None) -> dict[str, float | int]:
    """Validity, uniqueness, novelty and mean properties of generated SMILES.

    - validity: valid samples / samples (see _parse: empty or space-containing samples are invalid)
    - uniqueness: distinct canonical SMILES / valid samples (0 when none is valid)
    - novelty: distinct canonical SMILES not in ``training_set`` / distinct canonical SMILES (0 when
      none is valid); only when a training set is given, which must hold canonical SMILES
      (canonical_set or canonical_set_cached)
    - qed_mean, sa_mean, ring_count_mean: over valid samples, duplicates included; with a training
      set also over the novel molecules (``*_novel``), the paper's "mean property of novel samples".
      SA runs from 1 (easy to make) to 10 (hard).
    - ks_qed, ks_sa, ks_ring_count: with ``reference`` (`property_values` of held-out molecules),
      the KS distance between the valid samples' property distribution and the reference's: a
      guard beside vun, since a sampler can gain validity by drawing only small, easy molecules.
    """
    canonical_mols: dict[str, Any] = {}  # canonical SMILES -> molecule of its first occurrence
    valid: list[str] = []  # canonical SMILES of every valid sample, in order
    for sample in samples:
        mol = _parse(sample)
        if mol is None:
            continue
        canonical = _rdkit()[0].MolToSmiles(mol)
        valid.append(canonical)
        canonical_mols.setdefault(canonical, mol)
    n_samples, n_valid, n_unique = len(samples), len(valid), len(canonical_mols)
    result: dict[str, float | int] = {
        "n_samples": n_samples, "n_valid": n_valid, "n_unique": n_unique,
        "validity": n_valid / n_samples if n_samples else 0.0,
        "uniqueness": n_unique / n_valid if n_valid else 0.0,
    }
    novel: list[str] = []
    if training_set is not None:
        novel = [c for c in canonical_mols if c not in training_set]
        result.update(n_novel=len(novel), novelty=len(novel) / n_unique if n_unique else 0.0)
    if with_properties:
        # Each distinct molecule is scored once; QED is the slow part (~1 ms per molecule).
        properties = {c: _molecule_properties(mol) for c, mol in canonical_mols.items()}
        for index, name in enumerate(PROPERTIES):
            result[f"{name}_mean"] = _mean([properties[c][index] for c in valid])
            if training_set is not None:
                result[f"{name}_mean_novel"] = _mean([properties[c][index] for c in novel])
            if reference is not None:
                result[f"ks_{name}"] = ks_distance([properties[c][index] for c in valid], reference[name])
    return result


def require_fcd() -> ModuleType:
    """The optional ``fcd`` package, or an ImportError that says how to install it."""
    try:
        import fcd
    except ImportError as err:
        raise ImportError("the FCD needs the fcd package: pip install -e .[eval] (or pip install fcd)") from err
    return fcd


def fcd_score(samples: Sequence[str], reference: Sequence[str]) -> float:
    """Frechet ChemNet Distance between the valid canonical samples and the valid canonical reference.

    Needs the optional ``fcd`` package (ChemNet weights ship in its wheel). Biased upwards below a
    few thousand molecules per side, so compare only scores computed at equal sample counts.
    """
    fcd = require_fcd()
    # ChemNet only embeds molecules: invalid samples are dropped, as validity already counts them.
    samples_canonical = [c for c in map(canonical_smiles, samples) if c is not None]
    reference_canonical = [c for c in map(canonical_smiles, reference) if c is not None]
    if len(samples_canonical) < 2 or len(reference_canonical) < 2:
        raise ValueError("FCD needs at least 2 valid molecules on each side (and thousands to be unbiased)")
    return float(fcd.get_fcd(samples_canonical, reference_canonical))


# --------------------------------------------------------------------------------------------------
# English text
# --------------------------------------------------------------------------------------------------

# A word is a run of letters or digits, with single apostrophes inside (don't, o'clock, ne'er),
# which is how the CMU LM spells its 4.5k apostrophe words. Hyphens, underscores and all other
# punctuation separate words: the LM has only 229 hyphenated compounds, while splitting keeps
# "to-night" or "well-read" scorable as known words. Leading and trailing apostrophes are quote
# marks far more often than elisions ('tis becomes tis, which the LM has).
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
# Sentences end at runs of . ! ? and at blank lines (paragraphs, headings); single newlines do
# not end one, because verse and wrapped prose break lines inside sentences.
_SENTENCE_END = re.compile(r"[.!?]+|\n[ \t]*\n")


def words(text: str) -> list[str]:
    """The normalised words of a text: lowercased, curly apostrophes made straight, split by _WORD."""
    return _WORD.findall(text.lower().translate(_APOSTROPHES))


def sentences(text: str) -> list[list[str]]:
    """The normalised words of each sentence of a text (see _SENTENCE_END), empty sentences dropped."""
    return [ws for part in _SENTENCE_END.split(text) if (ws := words(part))]


def _pocketsphinx() -> ModuleType:
    try:
        import pocketsphinx
    except ImportError as err:
        raise ImportError(f"the trigram judge needs pocketsphinx: {EVAL_EXTRA} (or pip install pocketsphinx)") from err
    return pocketsphinx


def default_trigram_model_path() -> Path:
    """The CMU US-English trigram LM shipped in the pocketsphinx wheel."""
    path = Path(_pocketsphinx().get_model_path()) / "en-us" / "en-us.lm.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall pocketsphinx: "
                                "pip install --force-reinstall pocketsphinx")
    return path


class TrigramJudge:
    """Perplexity of English text under the CMU US-English word trigram LM (72.5k words, no <unk>).

    Scoring, per sentence (``sentences``): each in-vocabulary word w is scored as
    P(w | two previous words), starting from <s>. An out-of-vocabulary word is not scored, counts
    towards the OOV rate, and cuts the history, so the next word is scored as a unigram (which is
    also what pocketsphinx does with an unknown word in the history: the numbers agree). With
    ``sentence_boundaries`` the end of each sentence is also scored as P(</s> | history); without
    it, a text is one stream of words with no <s> or </s>.

    Always report the perplexity with the OOV rate: text made of unknown words scores little.
    """

    LOG_BASE = 1.0001  # pocketsphinx returns log probabilities in base 1.0001 (its LogMath default)
    _OOV_PROBE = "<proseco-oov-probe>"  # `words` never yields "<": asks the LM for its OOV sentinel

    def __init__(self, model_path: str | os.PathLike | None = None, *, sentence_boundaries: bool = True):
        NGramModel = _pocketsphinx().NGramModel
        self.model_path = Path(model_path) if model_path is not None else default_trigram_model_path()
        if not self.model_path.is_file():
            raise FileNotFoundError(f"no language model at {self.model_path}")
        self._lm = NGramModel.readfile(str(self.model_path))
        self.order = int(self._lm.size())
        # Unknown words come back as one large negative sentinel (-2**29 here); read it, don't assume it.
        self._oov_value = self._lm.prob([self._OOV_PROBE])
        has_boundaries = all(self._lm.prob([tag]) != self._oov_value for tag in ("<s>", "</s>"))
        if sentence_boundaries and not has_boundaries:
            raise ValueError(f"{self.model_path} has no <s>/</s>; use sentence_boundaries=False")
        self.sentence_boundaries = sentence_boundaries
        self._known: dict[str, bool] = {}

    def in_vocabulary(self, word: str) -> bool:
        """Whether the LM knows ``word`` (a normalised word, see ``words``); cached per word."""
        known = self._known.get(word)
        if known is None:
            known = self._known[word] = self._lm.prob([word]) != self._oov_value
        return known

    def log_prob(self, word: str, history: Sequence[str] = ()) -> float:
        """Natural-log P(word | history), history oldest first and cut to the model order;
        -inf for an unknown word."""
        if not self.in_vocabulary(word):
            return -math.inf
        context = list(history)[-(self.order - 1):] if self.order > 1 else []
        return self._lm.prob([word, *reversed(context)]) * math.log(self.LOG_BASE)

    def perplexity(self, texts: Sequence[str]) -> dict[str, float | int]:
        """Perplexity over the in-vocabulary words of ``texts`` pooled (token-weighted), and more:

        - perplexity: exp(mean negative log-likelihood of the in-vocabulary words)
        - perplexity_with_sentence_ends: the same with each sentence end (</s>) scored as a token
          (SRILM's "ppl"; perplexity is its "ppl1"); equal to perplexity without sentence boundaries
        - oov_rate: unknown words / all words; n_words: in-vocabulary words scored; n_oov;
          n_sentence_ends
        """
        history_len = self.order - 1
        # Raw sums in the LM's log base: one multiplication at the end instead of one per word.
        word_logs, end_logs = 0, 0
        n_words = n_oov = n_ends = 0
        for text in texts:
            streams = sentences(text) if self.sentence_boundaries else [words(text)]
            for stream in streams:
                history = ["<s>"] if self.sentence_boundaries else []
                for word in stream:
                    if not self.in_vocabulary(word):
                        n_oov += 1
                        history = []
                        continue
                    # pocketsphinx takes [word, previous, the one before, ...]: newest history first.
                    word_logs += self._lm.prob([word, *history[::-1]])
                    n_words += 1
                    history = (history + [word])[-history_len:] if history_len else []
                if self.sentence_boundaries:
                    end_logs += self._lm.prob(["</s>", *history[::-1]])
                    n_ends += 1
        to_nats = math.log(self.LOG_BASE)
        n_all = n_words + n_oov
        return {
            "perplexity": math.exp(-word_logs * to_nats / n_words) if n_words else math.nan,
            "perplexity_with_sentence_ends":
                math.exp(-(word_logs + end_logs) * to_nats / (n_words + n_ends)) if n_words + n_ends else math.nan,
            "oov_rate": n_oov / n_all if n_all else math.nan,
            "n_words": n_words, "n_oov": n_oov, "n_sentence_ends": n_ends,
        }


def unigram_entropy(token_ids: Sequence[Sequence[int]]) -> float:
    """Entropy (nats) of each sample's empirical token-id distribution, averaged over samples.

    As in the paper's OWT table: a sample of identical tokens has 0, one of k equally frequent
    distinct tokens has ln k. Low values flag repetitive samples. Accepts lists, numpy arrays or
    tensors (one row per sample).
    """
    if len(token_ids) == 0:
        raise ValueError("unigram_entropy needs at least one sample")
    entropies = []
    for sample in token_ids:
        ids = np.asarray(sample).ravel()
        if ids.size == 0:
            raise ValueError("unigram_entropy got an empty sample")
        _, counts = np.unique(ids, return_counts=True)
        p = counts / ids.size
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def _bigram_distribution(token_ids: Sequence[Sequence[int]]) -> Counter:
    """Counts of adjacent token-id pairs, within each row (pairs never cross rows)."""
    counts: Counter = Counter()
    for row in token_ids:
        ids = np.asarray(row).ravel()
        counts.update(zip(ids[:-1].tolist(), ids[1:].tolist()))
    return counts


def bigram_divergence(token_ids: Sequence[Sequence[int]], reference_ids: Sequence[Sequence[int]]) -> float:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between the token-bigram distribution of the
    samples and that of reference data (e.g. the validation split).

    0 when the samples' local statistics are the data's. Unlike an n-gram judge's perplexity it
    cannot be won by a collapsed sampler ("e e e e" has one bigram, far from the data's), nor by
    noise (a uniform sampler spreads over bigrams the data never has).
    """
    p, q = _bigram_distribution(token_ids), _bigram_distribution(reference_ids)
    total_p, total_q = sum(p.values()), sum(q.values())
    if not total_p or not total_q:
        raise ValueError("bigram_divergence needs samples and reference rows of at least two tokens")
    divergence = 0.0
    for pair in p.keys() | q.keys():
        a, b = p[pair] / total_p, q[pair] / total_q
        m = (a + b) / 2
        divergence += (a * math.log(a / m) if a else 0.0) + (b * math.log(b / m) if b else 0.0)
    return divergence / 2


def is_collapsed(sample_entropy: float, reference_entropy: float) -> bool:
    """A sampler whose samples use under half the unigram entropy of the data (per sample, as
    `unigram_entropy`) has collapsed onto a few tokens, whatever its other scores say."""
    return sample_entropy < 0.5 * reference_entropy


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / word n-grams, pooled over all samples (0 when there are none).

    Words as in ``words``; n-grams do not cross sample boundaries.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = _ngrams(words(text), n)
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def repetition_rate(texts: Sequence[str], n: int = 4, min_repeats: int = 3) -> float:
    """Fraction of samples in which some word n-gram occurs ``min_repeats`` or more times.

    A guard against degenerate loops ("i don't know. i don't know. i don't know."), which an
    n-gram judge can score as fluent. Occurrences may overlap: "a a a a a a" holds "a a a a" 3 times.
    """
    if not texts:
        raise ValueError("repetition_rate needs at least one sample")
    flagged = 0
    for text in texts:
        counts = Counter(_ngrams(words(text), n))
        flagged += bool(counts) and max(counts.values()) >= min_repeats
    return flagged / len(texts)


def text_metrics(texts: Sequence[str], *, token_ids: Sequence[Sequence[int]] | None = None,
                 judge: TrigramJudge | None = None) -> dict[str, float | int]:
    """The text metrics of one set of samples in one flat dict: distinct_1..3, repetition_rate,
    unigram_entropy (when the samples' token ids are given) and trigram_* (when a judge is given)."""
    result: dict[str, float | int] = {f"distinct_{n}": distinct_n(texts, n) for n in (1, 2, 3)}
    result["repetition_rate"] = repetition_rate(texts)
    if token_ids is not None:
        result["unigram_entropy"] = unigram_entropy(token_ids)
    if judge is not None:
        result.update({f"trigram_{k}": v for k, v in judge.perplexity(texts).items()})
    return result
