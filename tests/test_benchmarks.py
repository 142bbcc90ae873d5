"""benchmarks/stats.py: paired rounds in alternating order, median, IQR and the interval of the
median, the too-wide verdict, the adaptive stop. No timing: a fake clock advances by what each case says it costs."""

import random

import pytest
import torch

from benchmarks import run as run_benchmarks
from benchmarks.agreement import agreement_rows
from benchmarks.stats import (
    Spread,
    median_interval,
    paired_rounds,
    per_round_ratios,
    quartiles,
    ratio_row,
    round_order,
    setting,
)


def test_round_order_alternates():
    assert round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert round_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert round_order(["a", "b", "c"], 2) == ["a", "b", "c"]


def test_quartiles_and_iqr():
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert quartiles([7.0]) == (7.0, 7.0, 7.0)
    spread = Spread.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (spread.q1, spread.median, spread.q3, spread.rounds) == (2.0, 3.0, 4.0, 5)
    assert spread.relative_iqr == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        quartiles([])


def test_median_interval_is_the_order_statistics_of_95_percent():
    assert median_interval(list(range(1, 21))) == (6, 15)  # the textbook pair for n = 20
    assert median_interval(list(range(80, 0, -1))) == (31, 50)  # sorted first
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for 95 %: the whole range
    assert median_interval([4.0]) == (4.0, 4.0)
    with pytest.raises(ValueError):
        median_interval([])


def test_median_interval_covers_the_median_95_percent_of_the_time():
    generator = random.Random(0)
    runs = 2000
    covered = sum(low <= 0.0 <= high for low, high in
                  (median_interval([generator.gauss(0.0, 1.0) for _ in range(40)]) for _ in range(runs)))
    assert 0.94 <= covered / runs <= 0.99  # exact coverage for n = 40 is 0.962


def test_too_wide_verdict_and_text():
    wide_rounds = Spread.of([1.8, 1.9, 2.0, 2.1, 2.2] * 2)  # interval 1.8-2.2 on 2.0: 20 %
    many_rounds = Spread.of([1.8, 1.9, 2.0, 2.1, 2.2] * 40)  # the same rounds, 200 of them: 0 %
    assert wide_rounds.relative_iqr == many_rounds.relative_iqr == pytest.approx(0.1)
    assert wide_rounds.too_wide(0.05) and not wide_rounds.too_wide(0.25)
    assert not many_rounds.too_wide(0.05)  # rounds vary as much, but the median is known
    narrow = Spread.of([2.00, 2.01, 2.02, 2.03, 2.04, 2.02])
    assert narrow.text().startswith("median 2.020 (IQR 2.01")
    assert narrow.text().endswith("; 95 % interval of the median 2.000-2.040) of 6 paired rounds")
    assert "spread too wide: the interval of the median is 20.0 %" in wide_rounds.text()
    assert "too wide" not in wide_rounds.text(threshold=0.25)
    row = ratio_row("x", wide_rounds, "what it is")
    assert row["value"] == 2.0 and row["unit"] == "ratio" and row["spread"]["too_wide"]
    assert (row["spread"]["low"], row["spread"]["high"]) == (1.8, 2.2)
    assert row["what"].startswith("what it is, median 2.000 (IQR 1.900-2.100; 95 % interval")


def test_setting_from_environment(monkeypatch):
    monkeypatch.delenv("BENCH_TEST_KNOB", raising=False)
    assert setting("BENCH_TEST_KNOB", 16) == 16
    monkeypatch.setenv("BENCH_TEST_KNOB", "40")
    assert setting("BENCH_TEST_KNOB", 16) == 40 and setting("BENCH_TEST_KNOB", 1.5) == 40.0
    monkeypatch.setenv("BENCH_TEST_KNOB", "many")
    with pytest.raises(SystemExit, match="BENCH_TEST_KNOB"):
        setting("BENCH_TEST_KNOB", 16)


def test_per_round_ratios_pair_rounds():
    assert per_round_ratios({"a": [2.0, 6.0], "b": [1.0, 2.0]}, "a", "b") == [2.0, 3.0]
    with pytest.raises(ValueError, match="paired rounds"):
        per_round_ratios({"a": [2.0, 6.0], "b": [1.0]}, "a", "b")


class FakeClock:
    """A clock that each case advances by its cost; records the order the cases ran in."""

    def __init__(self):
        self.now, self.ran = 0.0, []

    def __call__(self) -> float:
        return self.now

    def case(self, name: str, costs):
        costs = iter(costs)

        def run():
            self.ran.append(name)
            self.now += next(costs)
        return run


def test_paired_rounds_alternate_and_pair():
    clock = FakeClock()
    cases = {"a": clock.case("a", [9.0] + [2.0, 4.0] * 10), "b": clock.case("b", [9.0] + [1.0, 2.0] * 10)}
    rounds = paired_rounds(cases, [("a", "b")], min_rounds=4, max_rounds=4, budget_s=1e9, warmup=1, clock=clock)
    assert clock.ran == ["a", "b"] + ["a", "b", "b", "a"] * 2  # warm-up, then alternating rounds
    assert rounds.times == {"a": [2.0, 4.0, 2.0, 4.0], "b": [1.0, 2.0, 1.0, 2.0]}  # warm-up not timed
    assert rounds.ratios("a", "b") == [2.0, 2.0, 2.0, 2.0]  # a round-to-round slowdown cancels
    assert rounds.stopped == "converged" and rounds.count == 4


def test_paired_rounds_stop_rules():
    steady = FakeClock()
    rounds = paired_rounds({"a": steady.case("a", [2.0] * 100), "b": steady.case("b", [1.0] * 100)}, [("a", "b")],
                           min_rounds=6, max_rounds=50, budget_s=1e9, warmup=0, clock=steady)
    assert rounds.stopped == "converged" and rounds.count == 6  # converges at the first check

    noisy_costs = [2.0, 3.0, 1.5, 2.5] * 25  # ratios 2, 3, 1.5, 2.5, ...: IQR ~ 40 % of the median
    noisy = FakeClock()
    rounds = paired_rounds({"a": noisy.case("a", noisy_costs), "b": noisy.case("b", [1.0] * 100)}, [("a", "b")],
                           min_rounds=4, max_rounds=20, budget_s=30.0, warmup=0, clock=noisy)
    assert rounds.stopped == "budget" and rounds.count % 2 == 0 and rounds.elapsed_s >= 30.0
    assert rounds.spread("a", "b").too_wide()

    capped = FakeClock()
    rounds = paired_rounds({"a": capped.case("a", noisy_costs), "b": capped.case("b", [1.0] * 100)}, [("a", "b")],
                           min_rounds=4, max_rounds=8, budget_s=1e9, warmup=0, clock=capped)
    assert rounds.stopped == "max_rounds" and rounds.count == 8
    with pytest.raises(ValueError, match="names a case"):
        paired_rounds({"a": capped.case("a", [])}, [("a", "z")], min_rounds=1, max_rounds=1, budget_s=1)


def test_agreement_rows_compare_medians_across_runs():
    def row(name, value, spread=True):
        return {"name": name, "value": value, "unit": "ratio", "what": "", **({"spread": {}} if spread else {})}

    runs = [[row("r", 0.80), row("x", 2.0), row("wall", 3.0, spread=False)],
            [row("r", 0.82), row("x", 2.2)],
            [row("r", 0.81), row("x", 2.1)]]
    rows = {r["name"]: r for r in agreement_rows(runs)}
    assert set(rows) == {"agreement_r", "agreement_x"}  # a figure without rounds is not compared
    assert rows["agreement_r"]["value"] == pytest.approx(0.82 / 0.80, abs=1e-4)
    assert "disagree" not in rows["agreement_r"]["what"] and "0.8, 0.82, 0.81" in rows["agreement_r"]["what"]
    assert rows["agreement_x"]["value"] == pytest.approx(1.1, abs=1e-4)
    assert "disagree by more than 5 %" in rows["agreement_x"]["what"]
    assert agreement_rows([runs[0], [row("x", 2.0)]]) == agreement_rows([[row("x", 2.0)], [row("x", 2.0)]])


def test_run_accepts_agreement_by_name_only():
    assert "agreement" in run_benchmarks.ON_REQUEST and "agreement" not in run_benchmarks.MODULES
    with pytest.raises(SystemExit, match="agreement"):  # the list of choices names it
        run_benchmarks.main(["no_such_benchmark"])


def test_gemm_flops_counts_the_gemms_only():
    from benchmarks.gemm_rate import gemm_flops, gemm_seconds, kernel_seconds

    a, b, weight, bias = torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 8), torch.randn(16)

    def step():  # mm, addmm (a linear with a bias), bmm: 2 * 4 * 8 * 16 FLOPs each; relu and softmax none
        torch.mm(a, b).relu()
        torch.nn.functional.linear(a, weight, bias).softmax(-1)
        torch.bmm(a[None], b[None])

    assert gemm_flops(step) == 3 * 2 * 4 * 8 * 16
    assert gemm_seconds(step, steps=1) > 0 and kernel_seconds(step, 1, lambda key: key == "aten::no_such_op") == 0


def test_official_stand_ins_for_flash_attn():
    """benchmarks/official.py's SDPA and rotary stand-ins compute what flash-attn's calls do."""
    from benchmarks.official import _rotary_qkv, _varlen_qkvpacked

    generator = torch.Generator().manual_seed(0)
    batch, seq, heads, dim = 2, 5, 3, 8
    qkv = torch.randn(batch * seq, 3, heads, dim, generator=generator)
    out = _varlen_qkvpacked(qkv, torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32), seq)
    q, k, v = qkv.view(batch, seq, 3, heads, dim).unbind(2)  # [B, S, H, D]
    weights = torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) / dim**0.5, dim=-1)
    expected = torch.einsum("bhst,bthd->bshd", weights, v).reshape(batch * seq, heads, dim)
    torch.testing.assert_close(out, expected)
    with pytest.raises(NotImplementedError):
        _varlen_qkvpacked(qkv, torch.tensor([0, 3, 10], dtype=torch.int32), seq)

    angles = torch.arange(seq)[:, None] * torch.rand(dim // 2, generator=generator)[None, :]  # [S, D/2]
    packed = qkv.view(batch, seq, 3, heads, dim)
    rotated = _rotary_qkv(packed, angles.cos(), angles.sin())
    torch.testing.assert_close(rotated[:, :, 2], packed[:, :, 2])  # v unchanged
    torch.testing.assert_close(rotated[:, 0], packed[:, 0])  # position 0: angle 0
    # non-interleaved: element i pairs with i + D/2, each pair turned by its angle
    first, second = packed[:, :, :2].chunk(2, dim=-1)
    as_complex = torch.complex(first, second) * torch.polar(torch.ones_like(angles), angles)[None, :, None, None]
    torch.testing.assert_close(rotated[:, :, :2], torch.cat([as_complex.real, as_complex.imag], dim=-1))


def test_official_stub_modules_raise_when_used():
    import importlib
    import sys

    from benchmarks.official import _StubFinder

    finder = _StubFinder(("no_such_gpu_package",))
    sys.meta_path.insert(0, finder)
    try:
        module = importlib.import_module("no_such_gpu_package.ops.kernels")
        stub = module.fused_kernel

        class Sub(stub):  # a stub can be subclassed at import time, as the official code does
            pass
        with pytest.raises(ImportError, match="is a stub"):
            stub()
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.startswith("no_such_gpu_package")]:
            del sys.modules[name]
