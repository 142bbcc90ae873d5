"""Run reporting: progress from the first step, loss curves that compare like with like."""

import matplotlib

from pretrain.config import RunConfig
from pretrain.metrics import MetricsLogger, loss_figure

matplotlib.use("Agg")


def test_plain_progress_starts_at_the_first_step_then_follows_the_clock(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 100.5, 101.0, 140.0, 141.0])  # creation, then one reading per step
    monkeypatch.setattr("pretrain.metrics.time.perf_counter", lambda: next(clock))
    logger = MetricsLogger(RunConfig(), tmp_path, enabled=True, total_steps=4, start_step=0, tokens_per_step=1000)
    for step, loss in enumerate((5.0, 4.0, 3.0, 2.0), start=1):
        logger.progress(step, loss)
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    # Step 1 at once (not "nan" or "0 tok/s"), step 2 held back (under 30 s), step 3 after 40 s, the last.
    assert [line.split()[1] for line in lines] == ["1/4", "3/4", "4/4"]
    assert "loss 5.0000  2,000 tok/s" in lines[0] and "eta 0:00:01" in lines[0]


def test_loss_curves_put_training_and_validation_on_their_own_axes():
    records = [{"split": "train", "step": s, "loss": 12.0, "mdlm_nelbo": 3.5, "corrector_nll": 8.5} for s in (1, 2)]
    records += [{"split": "val", "step": 2, "mdlm_nelbo": 3.3, "corrector_nll": 19.0}]
    fig = loss_figure(records, eps_train=0.1, eps_val=1e-3)
    axes = fig.axes
    titles = [ax.get_title() for ax in axes]
    assert titles[0].endswith("training, t ~ U[0.1, 1]") and titles[2].endswith("validation, t ~ U[0.001, 1], "
                                                                                 "EMA weights")
    plotted = [list(ax.get_lines()[0].get_ydata()) for ax in axes]
    assert plotted == [[3.5, 3.5], [8.5, 8.5], [3.3], [19.0]]  # one series per axes; no total loss
    assert all(len(ax.get_lines()) == 1 for ax in axes)
    assert "< 0" not in titles[1]
    matplotlib.pyplot.close(fig)
    # With errors up-weighted, correct positions score -p: the title warns that < 0 is expected.
    fig = loss_figure(records, eps_train=0.1, eps_val=1e-3, errors_upweighted=True)
    assert "errors up-weighted: < 0 is possible" in fig.axes[1].get_title()
    matplotlib.pyplot.close(fig)


def test_progress_off_prints_nothing(tmp_path, capsys):
    cfg = RunConfig()
    cfg.logging.progress = False
    logger = MetricsLogger(cfg, tmp_path, enabled=True, total_steps=2, start_step=0, tokens_per_step=10)
    logger.progress(1, 1.0)
    logger.close()
    assert capsys.readouterr().out == ""


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """The run id travels in the checkpoint: the resumed job logs to the same wandb run."""
    from pretrain.checkpoint import latest_checkpoint, read_meta
    from pretrain.train import train
    from tests.helpers import make_word_shards
    from tests.test_train import tiny_config

    monkeypatch.setenv("WANDB_SILENT", "true")
    shards = make_word_shards(tmp_path / "corpus")
    run = tmp_path / "run"
    for steps in (3, 6):
        train(tiny_config(shards, run, f"train.max_steps={steps}", "logging.wandb=offline", "train.eval_every=0"))
    run_id = read_meta(latest_checkpoint(run / "checkpoints"))["run_id"]
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[-1] for p in offline} == {run_id}
