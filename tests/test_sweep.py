"""`proseco eval`, `proseco sweep` and the end-of-run sample report end to end on tiny real runs
(a SMILES-like and a text corpus, char tokenizers, a few training steps), plus the grid and table
helpers."""

import json
import math
import random
from pathlib import Path

import pytest

from pretrain.cli import main as cli_main
from pretrain.config import load_config
from pretrain.sweep import GridPoint, make_grid, markdown_table, read_rows
from pretrain.train import train
from tests.helpers import write_smiles_lines
from tokenizer.shard import shard_corpus
from tokenizer.train import train_tokenizer

# Valid SMILES pieces; joined at random they give mostly valid molecules with a little structure.
WORDS = "the a king queen sword crown night day love war speaks runs falls sleeps red old young".split()


def tiny_overrides(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        f"data.shards={shards}", f"logging.run_dir={run_dir}", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=2", "model.cond_dim=16", "data.global_batch_size=8", "data.micro_batch_size=8",
        "data.num_workers=0", "optim.warmup_steps=2", "optim.lr=3e-3", "train.eval_every=0", "train.eval_batches=1",
        "checkpoint.every=0", "logging.progress=false", "sampling.num_samples=2", "sampling.batch_size=2",
        "sampling.steps=2", "train.max_steps=4", *overrides]


def tiny_run(shards: Path, run_dir: Path, *overrides: str) -> Path:
    train(load_config(None, tiny_overrides(shards, run_dir, *overrides)))
    return run_dir


@pytest.fixture(scope="module")
def smiles_run(tmp_path_factory) -> Path:
    """A 4-step ProSeCo run on SMILES-like lines, one molecule per padded 24-token sample."""
    root = tmp_path_factory.mktemp("smiles")
    corpus = write_smiles_lines(root / "smiles.txt", 300)
    train_tokenizer(str(corpus), "char", root / "tok", line_documents=True)
    # content="smiles" in the manifest makes the run a SMILES run (scored by RDKit).
    shard_corpus(str(corpus), root / "tok", seq_len=24, out=root / "shards", packing="pad", samples_per_shard=64,
                 workers=1, val_fraction=0.1, line_documents=True, content="smiles")
    return tiny_run(root / "shards", root / "run")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """A 4-step MDLM-only run on word salad, packed into 32-character samples."""
    root = tmp_path_factory.mktemp("text")
    rng = random.Random(1)
    docs = root / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:03d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + ".")
    train_tokenizer(str(docs), "char", root / "tok")
    shard_corpus(str(docs), root / "tok", seq_len=32, out=root / "shards", packing="pack", samples_per_shard=40,
                 workers=1, val_fraction=0.1)
    return tiny_run(root / "shards", root / "run", "diffusion.corrector_training=false", "name=text-mdlm")


def test_make_grid_lists_s0_once_per_steps_and_rejects_bad_values():
    grid = make_grid([8, 4], [2, 0], [1, 2])
    assert grid == [GridPoint(4, 0, 1), GridPoint(8, 0, 1), GridPoint(4, 2, 1), GridPoint(8, 2, 1),
                    GridPoint(4, 2, 2), GridPoint(8, 2, 2)]
    with pytest.raises(ValueError):
        make_grid([0], [0], [1])
    with pytest.raises(ValueError):
        make_grid([4], [], [1])


def test_eval_reports_nelbo_corrector_loss_and_sample_quality(smiles_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--checkpoint", str(smiles_run), "--batches", "2", "--samples", "8", "--steps", "4",
                     "--corrector-steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["train_step"] == 4 and result["split"] == "val" and result["trained_with_corrector"]
    assert 0 < result["mdlm_nelbo"] < 20
    assert result["perplexity_bound"] == pytest.approx(math.exp(result["mdlm_nelbo"]))
    assert math.isfinite(result["corrector_nll"]) and 0 <= result["corrector_output_error"] <= 1
    assert result["tokens"] == 2 * 8 * 24  # 2 batches of 8 samples of 24 tokens (val holds ~30 samples)
    samples = result["samples"]
    assert samples["num_samples"] == samples["n_samples"] == 8
    assert samples["nfe_total"] == pytest.approx(samples["nfe_denoiser"] + samples["nfe_corrector"])
    assert 4 <= samples["nfe_corrector"] <= 2 * 4  # one loop per step, 1 to S forwards each
    for key in ("validity", "uniqueness", "novelty", "qed_mean"):
        assert key in samples
    assert 0 <= samples["validity"] <= 1 and 0 <= samples["novelty"] <= 1
    # The canonical training set is cached in the run folder for the next evaluation.
    assert list((smiles_run / "cache").glob("canonical-smiles-*.txt.gz"))
    table = capsys.readouterr().out
    assert "| mdlm_nelbo |" in table and "| samples.validity |" in table


def test_sweep_writes_one_consistent_row_per_grid_point(smiles_run, tmp_path):
    out = tmp_path / "sweep"
    assert cli_main(["sweep", "--checkpoint", str(smiles_run), "--steps", "2,4,8", "--corrector-steps", "0,1,2",
                     "--corrector-every", "1,2", "--num-samples", "6", "--out", str(out)]) == 0
    rows = read_rows(out / "sweep.csv")
    expected = make_grid([2, 4, 8], [0, 1, 2], [1, 2])
    assert len(expected) == 3 + 2 * 2 * 3
    assert [GridPoint(r["steps"], r["corrector_steps"], r["corrector_every"]) for r in rows] == expected
    for row in rows:
        assert row["nfe_total"] == pytest.approx(row["nfe_denoiser"] + row["nfe_corrector"])
        assert 1 <= row["nfe_denoiser"] <= row["steps"]
        loops = row["steps"] // row["corrector_every"] if row["corrector_steps"] else 0
        assert loops <= row["nfe_corrector"] <= row["corrector_steps"] * loops  # 0 exactly when S = 0
        assert row["n_samples"] == 6 and {"validity", "uniqueness", "novelty", "qed_mean"} <= row.keys()
        assert row["nucleus_p"] == 1.0 and (row["unmasking"], row["nucleus_cache"]) == ("posterior", "once")
    by_setting: dict[tuple, list[dict]] = {}
    for row in rows:
        by_setting.setdefault((row["corrector_steps"], row["corrector_every"]), []).append(row)
    for series in by_setting.values():
        denoiser = [r["nfe_denoiser"] for r in sorted(series, key=lambda r: r["steps"])]
        assert denoiser == sorted(denoiser)  # more steps never cost fewer denoiser forwards
    # Each point's samples are kept as scored: their valid molecules and NFEs are the row's.
    from pretrain.quality import smiles_metrics
    for row in rows:
        name = f"{row['model']}_T{row['steps']}_S{row['corrector_steps']}_w{row['corrector_every']}.jsonl"
        kept = [json.loads(line) for line in (out / "samples" / name).read_text().splitlines()]
        assert len(kept) == 6 and all(len(k["tokens"]) == 24 for k in kept)
        assert smiles_metrics([k["text"] for k in kept], with_properties=False)["n_valid"] == row["n_valid"]
        assert sum(k["nfe_total"] for k in kept) / 6 == pytest.approx(row["nfe_total"])
    table = (out / "sweep.md").read_text().strip().splitlines()
    # Led by valid-unique-novel molecules per sample, which a collapsed sampler cannot win.
    header = "| model | T | S | omega | NFE den | NFE cor | NFE total | vun | validity | uniqueness | novelty"
    assert table[0].startswith(header)
    assert len(table) == 2 + len(expected)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --merge re-renders the same rows from CSV without sampling.
    assert cli_main(["sweep", "--merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = read_rows(tmp_path / "merged" / "sweep.csv")
    assert [json.dumps(r, sort_keys=True) for r in merged] == [json.dumps(r, sort_keys=True) for r in rows]  # nan-safe


def test_sweep_with_confidence_unmasking_and_the_official_cache(smiles_run, tmp_path):
    """The sampler switches reach every grid point and are recorded in its row; confidence
    unmasking leaves no mask and spends one denoiser forward per step that unmasks (T <= L)."""
    out = tmp_path / "sweep"
    assert cli_main(["sweep", "--checkpoint", str(smiles_run), "--steps", "4,8", "--corrector-steps", "0,1",
                     "--num-samples", "4", "--nucleus-p", "0.9", "--unmasking", "confidence",
                     "--nucleus-cache", "official", "--no-novelty", "--out", str(out)]) == 0
    rows = read_rows(out / "sweep.csv")
    assert len(rows) == 4
    for row in rows:
        assert (row["unmasking"], row["nucleus_cache"], row["nucleus_p"]) == ("confidence", "official", 0.9)
        assert row["masked_left"] == 0 and row["nfe_denoiser"] == row["steps"]


def test_sweep_on_text_reports_judge_entropy_and_repetition(text_run, tmp_path):
    out = tmp_path / "sweep"
    assert cli_main(["sweep", "--checkpoint", str(text_run), "--steps", "2,4", "--corrector-steps", "0",
                     "--num-samples", "4", "--out", str(out)]) == 0
    rows = read_rows(out / "sweep.csv")
    assert [r["model"] for r in rows] == ["text-mdlm", "text-mdlm"]
    for row in rows:
        assert row["nfe_corrector"] == 0
        assert 0 <= row["unigram_entropy"] <= math.log(32) and 0 <= row["repetition_rate"] <= 1
        assert 0 <= row["distinct_2"] <= 1 and "trigram_perplexity" in row and "trigram_oov_rate" in row
        assert 0 <= row["bigram_js"] <= math.log(2) and isinstance(row["collapsed"], bool)  # read back as a bool
    header = (out / "sweep.md").read_text().splitlines()[0]
    assert "trigram_perplexity" in header and "unigram_entropy" in header and "validity" not in header
    assert header.startswith("| model | T | S | omega | NFE den | NFE cor | NFE total | bigram_js |")


def test_collapsed_rows_say_so():
    rows = [{"model": "ProSeCo", "steps": 4, "corrector_steps": 2, "corrector_every": 1, "nfe_denoiser": 4.0,
             "nfe_corrector": 8.0, "nfe_total": 12.0, "bigram_js": 0.6, "collapsed": True},
            {"model": "MDLM", "steps": 4, "corrector_steps": 0, "corrector_every": 1, "nfe_denoiser": 4.0,
             "nfe_corrector": 0.0, "nfe_total": 4.0, "bigram_js": 0.2, "collapsed": False}]
    lines = markdown_table(rows).splitlines()
    assert lines[2].startswith("| ProSeCo (collapsed) |") and lines[3].startswith("| MDLM |")


def test_markdown_table_formats_missing_and_nan_cells():
    rows = [{"model": "m", "steps": 4, "corrector_steps": 0, "corrector_every": 1, "nfe_denoiser": 4.0,
             "nfe_corrector": 0.0, "nfe_total": 4.0, "validity": float("nan")},
            {"model": "m", "steps": 8, "corrector_steps": 1, "corrector_every": 1, "nfe_denoiser": 8.0,
             "nfe_corrector": 8.0, "nfe_total": 16.0, "validity": 0.5, "novelty": 1.0}]
    lines = markdown_table(rows).splitlines()
    assert lines[2] == "| m | 4 | 0 | 1 | 4.000 | 0.000 | 4.000 | nan |  |"
    assert lines[3].endswith("| 0.500 | 1.000 |")


def test_claim_report_compares_every_proseco_checkpoint_with_the_mdlm_curve(smiles_run, tmp_path):
    """The report's numbers on a hand-made sweep: the MDLM best, the NFE ratio, equal-NFE wins and
    their z statistics, and an earlier ProSeCo checkpoint (NAME@STEP) costed at its share."""
    from experiments.claim_report import report
    from pretrain.sweep import write_table

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "moses-proseco").symlink_to(smiles_run)
    tiny_run(smiles_run.parent / "shards", runs / "moses-mdlm", "diffusion.corrector_training=false")

    def row(model, steps, s, nfe, validity):
        return {"model": model, "steps": steps, "corrector_steps": s, "corrector_every": 1, "nucleus_p": 0.9,
                "nfe_total": nfe, "n_samples": 400, "validity": validity, "uniqueness": 1.0, "novelty": 1.0,
                "vun": validity}

    rows = [row("moses-mdlm", 4, 0, 4.0, 0.10), row("moses-mdlm", 8, 0, 8.0, 0.20),
            row("moses-mdlm", 16, 0, 16.0, 0.30),
            row("moses-proseco", 4, 1, 8.0, 0.30),    # equal NFE: 0.30 vs 0.20, z = 3.3; matches the best at 2x fewer
            row("moses-proseco", 4, 0, 4.0, 0.11),    # a win, but not beyond two standard errors
            row("moses-proseco", 16, 2, 48.0, 0.50),  # outside the MDLM curve: not comparable
            row("moses-proseco@2", 4, 0, 4.0, 0.05)]
    write_table(rows, tmp_path / "sweep")
    text = report("moses", runs, tmp_path / "sweep" / "sweep.csv")

    assert "(nucleus p: 0.90)" in text
    assert "best validity 0.300 at T = 16 (mean NFE 16.0)" in text
    sections = {part.split("\n", 1)[0]: part for part in text.split("### ")[1:]}
    full, half = sections["moses-proseco"], sections["moses-proseco@2"]
    assert "Fewest NFEs at which a setting of this model matches the MDLM best: 8.0" in full
    assert "2.00x fewer NFEs than the baseline" in full
    assert "| 4 | 1 | 1 | 8.0 | 0.300 | 0.200 | 3.3 |" in full
    assert "| 16 | 2 | 1 | 48.0 | 0.500 | nan | nan |" in full
    assert "at equal NFE: 2 of 2 comparable rows; by more than two standard errors: 1." in full
    assert "No setting of this model in the grid matches the MDLM best." in half
    assert "0 of 1 comparable rows" in half
    cost = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines() if line.startswith("| moses-")}
    assert cost["| moses-proseco@2"][2] == "2" and cost["| moses-proseco"][2] == "4"
    assert float(cost["| moses-proseco@2"][5]) == pytest.approx(float(cost["| moses-proseco"][5]) / 2, abs=1e-3)
    assert float(cost["| moses-proseco"][5]) == pytest.approx(2 * float(cost["| moses-mdlm"][5]), abs=1e-3)


def test_train_command_writes_the_sample_report(text_run, tmp_path, capsys):
    """`proseco train` samples the finished run's final EMA weights: three settings, table and rows."""
    run_dir = tmp_path / "run"
    assert cli_main(["train", *tiny_overrides(text_run.parent / "shards", run_dir, "train.max_steps=2")]) == 0
    report = (run_dir / "samples.md").read_text()
    assert "MDLM at equal NFE" in report and "unigram_entropy" in report
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["MDLM (no correction)", "ProSeCo (S=2, every 1)", "MDLM at equal NFE"]
    assert rows[2]["steps"] == round(rows[1]["nfe_total"]) and rows[2]["nfe_corrector"] == 0
    assert "samples (EMA weights):\n" + report.rstrip("\n") in capsys.readouterr().out


def test_sample_report_of_a_smiles_run_counts_novel_molecules(smiles_run, capsys):
    """The report judges molecules against the run's training set: novelty, and vun counts only
    valid, unique and novel samples."""
    import torch

    from pretrain.report import write_sample_report

    write_sample_report(smiles_run, torch.device("cpu"))
    rows = [json.loads(line) for line in (smiles_run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("novelty" in row and "n_novel" in row for row in rows)
    # The property guards against held-out molecules sit beside vun (nan only without valid samples).
    assert all(0 <= row["ks_qed"] <= 1 or (math.isnan(row["ks_qed"]) and row["n_valid"] == 0) for row in rows)
    for row in rows:
        assert row["vun"] == row["n_novel"] / 2 <= row["validity"]
    header = (smiles_run / "samples.md").read_text().splitlines()[0]
    assert "| vun |" in header and "| novelty |" in header
