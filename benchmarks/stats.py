"""Statistics of paired, interleaved benchmark rounds, shared by the benchmarks.

These machines are shared: a neighbour's job can slow one measurement by 2x and the next not at
all. A ratio of two medians taken minutes apart inherits all of that. What holds up is pairing:
each round times every case once, back to back, and gives one ratio a_i / b_i per round, so a
slowdown that lasts longer than a round hits both sides alike and cancels. The order alternates
(A B C .. on even rounds, .. C B A on odd ones) so that neither side always runs first (warm
caches, a turbo clock that fades). The figure is the median of the per-round ratios, reported
with its interquartile range (how much one round varies) and the 95 % confidence interval of the
median (how far another run's median may land; distribution-free, from the order statistics).
The interval is what decides whether a figure can be trusted: it narrows as rounds are added,
while the IQR of a noisy machine does not, and two runs whose intervals are within `TOO_WIDE` of
the median agree within about that much. Rounds are added until every interval is that narrow;
a figure whose interval stays wider says so in its row instead of passing as a number to trust.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TOO_WIDE = 0.05  # a 95 % interval of the median wider than this fraction of it: not to be trusted
CONFIDENCE = 0.95


def setting(name: str, default: float) -> float:
    """A round count or time budget: environment variable `name` if set, else `default` (so that
    `make bench`, which passes no flags, can be given more rounds: BENCH_BUDGET_S=900 make bench)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return type(default)(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r} is not a {type(default).__name__}") from None


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of `values` (inclusive method: the quartiles of the values themselves, so
    they never lie outside them; one value gives itself three times)."""
    if not values:
        raise ValueError("quartiles of no values")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free `confidence` interval of the median of `values`: the order statistics
    x_(r) and x_(n+1-r) for the largest r whose coverage, 1 - 2 P(Bin(n, 1/2) < r), is at least
    `confidence`. Below 6 values no pair covers 95 %: the interval is then the whole range."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        raise ValueError("an interval of no values")
    r, below = 1, 1 / 2**n  # below: P(Bin(n, 1/2) < r)
    while r + 1 <= (n + 1) / 2:
        below_next = below + math.comb(n, r) / 2**n
        if 1 - 2 * below_next < confidence:
            break
        r, below = r + 1, below_next
    return ordered[r - 1], ordered[n - r]


@dataclass(frozen=True)
class Spread:
    """Median, interquartile range and the confidence interval of the median of per-round values."""

    median: float
    q1: float
    q3: float
    low: float  # the CONFIDENCE interval of the median
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        q1, median, q3 = quartiles(values)
        low, high = median_interval(values)
        return cls(median=median, q1=q1, q3=q3, low=low, high=high, rounds=len(values))

    def _relative(self, width: float) -> float:
        return width / abs(self.median) if self.median else float("inf")

    @property
    def relative_iqr(self) -> float:
        """(q3 - q1) / |median|: how much one round varies, as a fraction of the figure."""
        return self._relative(self.q3 - self.q1)

    @property
    def relative_interval(self) -> float:
        """(high - low) / |median|: how far another run's median may land, as a fraction of the figure."""
        return self._relative(self.high - self.low)

    def too_wide(self, threshold: float = TOO_WIDE) -> bool:
        return self.relative_interval > threshold

    def text(self, digits: int = 3, threshold: float = TOO_WIDE) -> str:
        """'median 2.105 (IQR 2.080-2.130; 95 % interval of the median 2.095-2.115) of 21 paired
        rounds', plus '; spread too wide: ...' when that interval is wider than `threshold` of the
        median."""
        out = (f"median {self.median:.{digits}f} (IQR {self.q1:.{digits}f}-{self.q3:.{digits}f}; "
               f"{100 * CONFIDENCE:.0f} % interval of the median {self.low:.{digits}f}-{self.high:.{digits}f}) "
               f"of {self.rounds} paired rounds")
        if self.too_wide(threshold):
            out += (f"; spread too wide: the interval of the median is {100 * self.relative_interval:.1f} % of it "
                    f"(limit {100 * threshold:.0f} %), do not trust this figure")
        return out


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The cases in the order round `round_index` runs them: as given on even rounds, reversed on
    odd ones (A B C, C B A, A B C, ...)."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def per_round_ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """a_i / b_i for every round i (both lists come from the same rounds)."""
    a, b = times[numerator], times[denominator]
    if len(a) != len(b):
        raise ValueError(f"{numerator} has {len(a)} rounds, {denominator} {len(b)}: ratios need paired rounds")
    return [x / y for x, y in zip(a, b)]


@dataclass
class Rounds:
    """What `paired_rounds` measured: seconds per case per round, and why it stopped."""

    times: dict[str, list[float]]
    stopped: str  # "converged", "budget" or "max_rounds"
    elapsed_s: float

    @property
    def count(self) -> int:
        return len(next(iter(self.times.values())))

    def ratios(self, numerator: str, denominator: str) -> list[float]:
        return per_round_ratios(self.times, numerator, denominator)

    def spread(self, numerator: str, denominator: str) -> Spread:
        return Spread.of(self.ratios(numerator, denominator))

    def describe(self) -> str:
        return {"converged": f"{self.count} rounds (stopped once every interval of a median was within the limit)",
                "budget": f"{self.count} rounds (stopped at the time budget, {self.elapsed_s:.0f} s)",
                "max_rounds": f"{self.count} rounds (the maximum)"}[self.stopped]


def paired_rounds(cases: dict[str, Callable[[], object]], pairs: Sequence[tuple[str, str]], *, min_rounds: int,
                  max_rounds: int, budget_s: float, threshold: float = TOO_WIDE, warmup: int = 1,
                  clock: Callable[[], float] = time.perf_counter) -> Rounds:
    """Time every case of `cases` once per round, in `round_order`, after `warmup` untimed rounds.

    Stops after `min_rounds` as soon as every ratio of `pairs` (numerator, denominator) has a
    confidence interval of its median within `threshold` of it, or when `budget_s` seconds of rounds have passed, or at
    `max_rounds`. Always runs an even number of rounds where it can, so both orders count alike.
    """
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"need 1 <= min_rounds ({min_rounds}) <= max_rounds ({max_rounds})")
    names = list(cases)
    for numerator, denominator in pairs:
        if numerator not in cases or denominator not in cases:
            raise ValueError(f"pair {numerator}/{denominator} names a case not in {names}")
    for i in range(warmup):
        for name in round_order(names, i):
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = clock()
    stopped = "max_rounds"
    for i in range(max_rounds):
        for name in round_order(names, i):
            began = clock()
            cases[name]()
            times[name].append(clock() - began)
        done = i + 1
        if done < min_rounds or done % 2:
            continue
        if all(not Spread.of(per_round_ratios(times, a, b)).too_wide(threshold) for a, b in pairs):
            stopped = "converged"
            break
        if clock() - start >= budget_s:
            stopped = "budget"
            break
    return Rounds(times=times, stopped=stopped, elapsed_s=clock() - start)


def ratio_row(name: str, spread: Spread, what: str, digits: int = 3, threshold: float = TOO_WIDE) -> dict:
    """A benchmark row for a paired ratio: the median as the value, the spread in the text, and
    the spread itself (q1, q3, rounds, too_wide) for docs/benchmarks.details.json."""
    return {"name": name, "value": round(spread.median, digits), "unit": "ratio",
            "what": f"{what}, {spread.text(digits, threshold)}",
            "spread": {"q1": round(spread.q1, digits + 1), "q3": round(spread.q3, digits + 1),
                       "low": round(spread.low, digits + 1), "high": round(spread.high, digits + 1),
                       "rounds": spread.rounds, "too_wide": spread.too_wide(threshold)}}


def add_round_arguments(parser: argparse.ArgumentParser, min_rounds: int, max_rounds: int, budget_s: float) -> None:
    """The command-line knobs of `paired_rounds` (their defaults: the BENCH_* settings)."""
    parser.add_argument("--min-rounds", type=int, default=min_rounds, help="rounds before the first stop check")
    parser.add_argument("--max-rounds", type=int, default=max_rounds, help="stop after this many rounds")
    parser.add_argument("--budget-s", type=float, default=budget_s, help="stop adding rounds after this long")
    parser.add_argument("--threshold", type=float, default=TOO_WIDE,
                        help="stop once every median's 95 %% interval is within this fraction of it; wider is flagged")


def rounds_main(run: Callable[[int, int, float, float], list[dict]], doc: str, argv: list[str] | None,
                min_rounds: int, max_rounds: int, budget_s: float) -> None:
    """The command line of a benchmark of paired rounds: its round knobs, then its rows as JSON."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_round_arguments(parser, min_rounds, max_rounds, budget_s)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.min_rounds, args.max_rounds, args.budget_s, args.threshold), indent=2))
