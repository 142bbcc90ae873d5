"""The experiment scripts of issue 17: E1's selection and verdict rules on hand-made rows, and
(slow) both scripts end to end on a few-step configuration of real QM9 data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import finetune_report, qm9_prompted
from pretrain.sweep import NFE_COLUMNS, SETTING_COLUMNS, read_rows

REPO = Path(__file__).resolve().parents[1]


def _row(model, steps, s, nfe, vun, validity, uniqueness=1.0, n=1024, **extra):
    return {"model": model, "steps": steps, "corrector_steps": s, "corrector_every": 1, "nfe_total": nfe,
            "vun": vun, "validity": validity, "uniqueness": uniqueness, "num_samples": n,
            "n_valid": int(validity * n), "checkpoint": f"runs/{model}", **extra}


def test_frontier_and_selection_keep_each_models_best_and_its_cheaper_tradeoffs():
    rows = [_row("B", 4, 0, 4.0, 0.10, 0.2), _row("B", 8, 0, 8.0, 0.30, 0.4), _row("B", 16, 0, 16.0, 0.25, 0.5),
            _row("B", 4, 2, 12.0, 0.35, 0.5), _row("A", 32, 0, 30.0, 0.40, 0.6), _row("A", 64, 0, 31.0, 0.40, 0.6)]
    assert [(r["steps"], r["corrector_steps"]) for r in finetune_report.frontier(rows[:4])] == [(4, 0), (8, 0), (4, 2)]
    chosen = finetune_report.select(rows)
    # A: its best once (the cheaper of the tie); B: the frontier, whose last point is its best.
    assert [(r["model"], r["steps"], r["corrector_steps"]) for r in chosen] == [
        ("A", 32, 0), ("B", 4, 0), ("B", 8, 0), ("B", 4, 2)]


@pytest.mark.parametrize("candidate_nfe, expected", [(10.0, "reproduced"), (20.0, "partial"), (30.0, "refuted")])
def test_speed_verdict_by_the_nfe_ratio_of_the_cheapest_match(candidate_nfe, expected):
    rows = [_row("A", 32, 0, 32.0, 0.50, 0.70), _row("A", 8, 0, 8.0, 0.30, 0.50),
            _row("B", 8, 1, candidate_nfe, 0.485, 0.69),   # within 2 points on both
            _row("B", 4, 1, 6.0, 0.45, 0.69)]               # vun 5 points short: no match
    result = finetune_report.verdict(rows, "A", "B")
    assert result["baseline_best"]["steps"] == 32
    assert result["match"]["nfe_total"] == candidate_nfe
    assert result["speed_verdict"] == expected


def test_no_match_is_refuted_and_higher_quality_needs_two_standard_errors_and_guards():
    base = _row("A", 32, 0, 32.0, 0.50, 0.70, ks_qed=0.10)
    assert finetune_report.verdict([base, _row("B", 8, 1, 10.0, 0.40, 0.7)], "A", "B")["speed_verdict"] == "refuted"
    better = _row("B", 16, 2, 40.0, 0.60, 0.80, ks_qed=0.12)  # +10 points: ~4.5 standard errors at n=1024
    result = finetune_report.verdict([base, better], "A", "B")
    assert result["higher_quality"] and result["vun_gap"] == pytest.approx(0.10)
    worse_guard = dict(better, ks_qed=0.20)  # QED distribution 0.10 further from the held-out one
    assert not finetune_report.verdict([base, worse_guard], "A", "B")["higher_quality"]
    small = _row("B", 16, 2, 40.0, 0.52, 0.72)  # +2 points: within noise
    assert not finetune_report.verdict([base, small], "A", "B")["higher_quality"]
    with pytest.raises(ValueError, match="rows of both"):
        finetune_report.verdict([base], "A", "B")


def test_prompted_verdict_matches_the_one_token_per_step_baseline():
    def row(model, steps, s, nfe, validity, exact):
        return {"model": model, "steps": steps, "corrector_steps": s, "nfe_total": nfe, "validity": validity,
                "exact_recovery": exact}
    rows = [row("A", 28, 0, 28.0, 0.90, 0.30), row("A", 7, 0, 7.0, 0.60, 0.10),
            row("B", 7, 1, 14.0, 0.89, 0.29), row("B", 7, 0, 7.0, 0.70, 0.15)]
    result = qm9_prompted.verdict(rows, "A", "B", generated=28)
    assert result["match"]["nfe_total"] == 14.0 and result["nfe_ratio"] == 2.0 and result["reproduced"]
    rows[2]["exact_recovery"] = 0.25  # 5 points short on exact recovery: no match
    assert not qm9_prompted.verdict(rows, "A", "B", generated=28)["reproduced"]
    with pytest.raises(ValueError, match="one token per step"):
        qm9_prompted.verdict(rows, "A", "B", generated=14)


TINY = ("model.d_model=32 model.n_heads=2 model.n_layers=1 model.cond_dim=16 data.global_batch_size=8 "
        "data.micro_batch_size=8 train.eval_every=0 train.eval_batches=1 checkpoint.every=2 sampling.num_samples=8 "
        "sampling.batch_size=8 optim.warmup_steps=1")


@pytest.mark.slow
def test_e1_and_e2_scripts_end_to_end_on_a_few_steps_of_qm9(tmp_path):
    proseco = str(Path(sys.executable).with_name("proseco"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = tmp_path / "data"
    subprocess.run([proseco, "tokenizer", "train", "--corpus", "qm9", "--kind", "char", "--limit", "2000",
                    "--out", str(data / "tokenizer")], check=True, env=env, capture_output=True)
    subprocess.run([proseco, "tokenizer", "shard", "--corpus", "qm9", "--tokenizer", str(data / "tokenizer"),
                    "--seq-len", "32", "--packing", "pad", "--limit", "2000", "--out", str(data / "shards")],
                   check=True, env=env, capture_output=True)
    runs = tmp_path / "runs"
    e1 = {**env, "RUNS": str(runs), "PROSECO": proseco, "PYTHON": sys.executable, "BASE_STEPS": "4",
          "MORE_STEPS": "2", "SELECT_SAMPLES": "16", "REPORT_SAMPLES": "16", "PLAIN_STEPS": "4,8",
          "FAST_STEPS": "4", "CORRECTOR_STEPS": "1", "OMEGAS": "1,2", "GRIDS": "main confidence", "FCD": "0",
          "TRAIN_OVERRIDES": f"data.shards={data / 'shards'} {TINY}"}
    for stage in ("train", "select", "report"):
        done = subprocess.run(["bash", str(REPO / "experiments/qm9_finetune.sh"), stage], env=e1, cwd=REPO,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    # B branched from the base at step 4 with the ProSeCo objective; A@6 was kept beside A@8.
    assert "resumed from" in (runs / "proseco.log").read_text()
    assert (runs / "mdlm/checkpoints/step_00000006").is_dir()
    report = (runs / "report.md").read_text()
    assert "speed-up verdict" in report and "higher quality" in report
    assert (runs / "report.png").exists() and (runs / "report-selection.png").exists()
    # The confidence grid samples every model with confidence-ordered unmasking: a secondary table.
    assert {r["unmasking"] for r in read_rows(runs / "select-confidence/sweep.csv")} == {"confidence"}
    assert "## Secondary: select-confidence" in report
    reported = read_rows(runs / "report-main/sweep.csv")
    assert {r["model"] for r in reported} == {"base@4", "A@6", "A@8", "B@6"}
    assert all(r["num_samples"] == 16 for r in reported)
    # Rerunning a finished stage redoes nothing.
    again = subprocess.run(["bash", str(REPO / "experiments/qm9_finetune.sh"), "train"], env=e1, cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 0 and "train " not in again.stdout
    # The four models exported, imported into runs that have no training runs, sample the same.
    models, elsewhere = tmp_path / "models", {**e1, "RUNS": str(tmp_path / "runs-imported")}
    for stage, stage_env in (("export", e1), ("import", elsewhere), ("select", elsewhere)):
        done = subprocess.run(["bash", str(REPO / "experiments/qm9_finetune.sh"), stage],
                              env={**stage_env, "MODELS": str(models)}, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in models.iterdir()) == ["A@6", "A@8", "B@6", "base@4"]
    compared = (*SETTING_COLUMNS, *NFE_COLUMNS, "vun", "validity", "uniqueness", "novelty")
    imported = read_rows(tmp_path / "runs-imported/select-main/sweep.csv")
    assert [[r[c] for c in compared] for r in imported] == [
        [r[c] for c in compared] for r in read_rows(runs / "select-main/sweep.csv")]

    out = tmp_path / "e2"
    done = subprocess.run([sys.executable, "-m", "experiments.qm9_prompted", "--model", f"A@8={runs / 'mdlm'}",
                           "--model", f"B@6={runs / 'proseco'}", "--baseline", "A@8", "--candidate", "B@6",
                           "--num-molecules", "16", "--batch-size", "8", "--corrector-steps", "1",
                           "--corrector-every", "1", "--out", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_rows(out / "sweep.csv")
    # Plain rows at T = 28 (one token per step), 14 and 7 for both models, corrector rows for B only.
    assert sorted((r["model"], r["steps"], r["corrector_steps"]) for r in rows) == sorted(
        [(m, t, 0) for m in ("A@8", "B@6") for t in (7, 14, 28)] + [("B@6", t, 1) for t in (7, 14, 28)])
    assert all(0 <= r["exact_recovery"] <= r["validity"] + 1e-9 for r in rows)
    assert "reproduced" in (out / "prompted.md").read_text() and (out / "prompted.png").exists()


@pytest.mark.parametrize("stage, grids, message", [("train", "main p0.9", "unknown grid p0.9 in GRIDS"),
                                                    ("trian", "main", "unknown stage trian")])
def test_e1_script_rejects_an_unknown_stage_or_grid_before_any_stage_runs(tmp_path, stage, grids, message):
    """A misspelt grid fails at once, not at selection hours after training; nothing is started."""
    runs = tmp_path / "runs"
    done = subprocess.run(["bash", str(REPO / "experiments/qm9_finetune.sh"), stage], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "RUNS": str(runs), "GRIDS": grids, "PROSECO": "false"})
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not runs.exists()
