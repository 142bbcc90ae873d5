"""Classifier-free guidance: the label embedding, keyed label dropout, labels through both passes
of the step, the guided sampler (gamma * cond + (1 - gamma) * uncond on log-probabilities, the
corrector on the conditional branch), the config's errors, and a labelled run end to end."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from parallel.runner import LocalRunner
from pretrain.config import DiffusionConfig, SamplingConfig, load_config, validate
from pretrain.diffusion import NoiseSchedule
from pretrain.errors import ConfigError, UserError
from pretrain.models import ModelShape, count_parameters
from pretrain.models.dit.config import DiTConfig, num_parameters
from pretrain.models.dit.model import DiT
from pretrain.sampler import Sampler, guided_scores
from pretrain.step import Objective, forward_backward
from tests.test_model import randomise

VOCAB, MASK, L, CLASSES = 24, 23, 16, 3
CFG = DiTConfig(d_model=32, n_layers=2, n_heads=2, cond_dim=16, num_classes=CLASSES)


def labelled_model() -> DiT:
    torch.manual_seed(0)
    model = DiT(CFG, ModelShape(VOCAB, L))
    randomise(model)  # at the real initialisation the zero adaLN layers make c, and so labels, irrelevant
    return model


def objective(**overrides) -> Objective:
    return Objective.build(DiffusionConfig(**overrides), mask_id=MASK, vocab_size=VOCAB, seed=11, global_batch_size=6,
                           num_classes=CLASSES)


def make_batch(rows: int = 6, first: int = 0, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, MASK, (rows, L), generator=generator),
            "position": torch.arange(first, first + rows), "valid": torch.ones(rows, dtype=torch.bool),
            "label": torch.randint(0, CLASSES, (rows,), generator=generator)}


# ---------------------------------------------------------------------------------------------
# The model


def test_label_embedding_has_the_official_name_and_a_null_class():
    model = labelled_model()
    table = dict(model.named_parameters())["cond_map.embedding_table.weight"]
    assert table.shape == (CLASSES + 1, CFG.cond_dim)
    assert num_parameters(CFG, VOCAB) == count_parameters(model)
    tokens = torch.randint(0, MASK, (4, L))
    with torch.no_grad():
        unlabelled = model(tokens)
        null = model(tokens, None, torch.full((4,), CLASSES))
        per_class = [model(tokens, None, torch.full((4,), k)) for k in range(CLASSES)]
    assert torch.equal(unlabelled, null)  # no labels: the unconditional model
    assert all((logits - null).abs().max() > 1e-3 for logits in per_class)
    with pytest.raises(ValueError, match="num_classes=0"):
        DiT(DiTConfig(d_model=32, n_layers=1, n_heads=2, cond_dim=16), ModelShape(VOCAB, L))(tokens, None,
                                                                                           torch.zeros(4).long())


# ---------------------------------------------------------------------------------------------
# Label dropout and the step


def test_label_dropout_is_keyed_by_position_and_at_the_configured_rate():
    rows = 20000
    batch = {"label": torch.randint(0, CLASSES, (rows,)), "position": torch.arange(rows) + 12345}
    dropped = objective(cond_dropout=0.25).labels(batch, training=True)
    null = dropped == CLASSES
    assert abs(null.float().mean().item() - 0.25) < 0.015  # binomial sd 0.003
    assert torch.equal(dropped[~null], batch["label"][~null])
    # Keyed by position: any split of the batch (micro-batches, data-parallel ranks) drops the same labels.
    order = torch.randperm(rows)
    parts = [objective(cond_dropout=0.25).labels({k: v[order][i::3] for k, v in batch.items()}, training=True)
             for i in range(3)]
    regathered = torch.empty_like(dropped)
    for i, part in enumerate(parts):
        regathered[order[i::3]] = part
    assert torch.equal(regathered, dropped)
    # Another step's samples (other positions) drop other labels; validation and rate 0 drop none.
    later = objective(cond_dropout=0.25).labels({**batch, "position": batch["position"] + rows}, training=True)
    assert not torch.equal(later == CLASSES, null)
    assert torch.equal(objective(cond_dropout=0.25).labels(batch, training=False), batch["label"])
    assert torch.equal(objective(cond_dropout=0.0).labels(batch, training=True), batch["label"])
    assert objective().labels({"position": batch["position"]}, training=True) is None


class LabelRecorder(torch.nn.Module):
    """Wraps a model and records the labels of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, tokens, sigma=None, labels=None):
        self.calls.append(None if labels is None else labels.clone())
        return self.model(tokens, sigma, labels)


@pytest.mark.parametrize("mode", ["reuse", "two_pass"])
def test_both_passes_see_the_dropped_labels_and_the_labels_change_the_loss(mode):
    model = labelled_model()
    recorder = LabelRecorder(model)
    obj = objective(cond_dropout=0.5)
    batch = make_batch()
    metrics = forward_backward(LocalRunner(recorder), [batch], obj, step=0, mode=mode, backward_scale=1.0)
    expected = obj.labels(batch, training=True)
    assert (expected == CLASSES).any() and (expected != CLASSES).any()
    if mode == "reuse":  # z_t, then y
        assert len(recorder.calls) == 2 and all(torch.equal(c, expected) for c in recorder.calls)
    else:  # pass 1 on z_t, then [z_t; y]
        assert torch.equal(recorder.calls[0], expected)
        assert torch.equal(recorder.calls[1], torch.cat([expected, expected]))
    other = {**batch, "label": (batch["label"] + 1) % CLASSES}
    changed = forward_backward(LocalRunner(model), [other], objective(cond_dropout=0.0), step=0, mode=mode,
                               backward_scale=1.0)
    same = forward_backward(LocalRunner(model), [batch], objective(cond_dropout=0.0), step=0, mode=mode,
                            backward_scale=1.0)
    assert abs(changed.loss.item() - same.loss.item()) > 1e-4
    assert metrics.loss.isfinite()


def test_two_pass_equals_reuse_with_labels():
    model = labelled_model()
    results = []
    for mode in ("reuse", "two_pass"):
        model.zero_grad()
        loss = forward_backward(LocalRunner(model), [make_batch()], objective(cond_dropout=0.5), step=0, mode=mode,
                                backward_scale=1.0).loss
        results.append((loss, model.cond_map.embedding_table.weight.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    assert torch.allclose(grad_a, grad_b, rtol=1e-5, atol=1e-7) and grad_a.abs().max() > 0


# ---------------------------------------------------------------------------------------------
# Guided sampling


def test_guided_scores_equal_the_formula_on_a_hand_built_case():
    p_cond = torch.tensor([0.5, 0.25, 0.25])
    p_uncond = torch.tensor([0.25, 0.5, 0.25])
    # Unnormalised scores (logits up to a constant) are what the sampler holds.
    cond, uncond = p_cond.log() + 3.0, p_uncond.log() - 1.0
    # gamma = 2: p_cond^2 / p_uncond = [1, 1/8, 1/4], normalised by 11/8.
    assert torch.allclose(guided_scores(cond, uncond, 2.0).softmax(-1), torch.tensor([8, 1, 2]) / 11.0)
    assert torch.allclose(guided_scores(cond, uncond, 1.0).softmax(-1), p_cond)
    assert torch.allclose(guided_scores(cond, uncond, 0.0).softmax(-1), p_uncond)
    # Suppressed entries (the mask: NEG_INF, finite) stay suppressed, with no NaN from the mix.
    masked = torch.tensor([0.0, 1.0, -1e6])
    mixed = guided_scores(masked, torch.tensor([1.0, 0.0, -1e6]), 5.0)
    assert mixed.isfinite().all() and mixed.softmax(-1)[2] == 0


class FixedByLabel(torch.nn.Module):
    """Logits that depend only on the label: row k of a table (the null class: the last row)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.calls: list[torch.Tensor] = []

    def forward(self, tokens, sigma=None, labels=None):
        labels = torch.full((tokens.shape[0],), self.table.shape[0] - 1) if labels is None else labels
        self.calls.append(labels.clone())
        return self.table[labels][:, None, :].expand(tokens.shape[0], tokens.shape[1], -1)


def sampler(model, num_classes=CLASSES, **overrides) -> Sampler:
    cfg = SamplingConfig(**{"steps": 8, "batch_size": 4, **overrides})
    return Sampler(model, cfg, mask_id=MASK, vocab_size=VOCAB, seq_len=L, schedule=NoiseSchedule(DiffusionConfig()),
                   num_classes=num_classes)


def test_the_denoiser_mixes_one_batched_forward_of_both_branches():
    table = torch.randn(CLASSES + 1, VOCAB)
    model = FixedByLabel(table)
    s = sampler(model, label=1, guidance=3.0)
    x = torch.full((4, L), MASK)
    scores, cond = s._denoise(x, torch.ones(4, dtype=torch.bool), 0.0)
    assert len(model.calls) == 1 and model.calls[0].tolist() == [1] * 4 + [CLASSES] * 4
    bias = torch.zeros(VOCAB)
    bias[MASK] = -1e6
    expected = (3.0 * (table[1] + bias).log_softmax(-1) - 2.0 * (table[CLASSES] + bias).log_softmax(-1)).softmax(-1)
    assert torch.allclose(scores[0, 0].softmax(-1), expected, atol=1e-6)
    assert torch.allclose(cond[0, 0], table[1] + bias)


def test_gamma_one_is_the_conditional_model_and_gamma_zero_the_unconditional_one():
    model = labelled_model()

    class Fixed(torch.nn.Module):  # the model with its label fixed, seen by an unlabelled sampler
        def __init__(self, label):
            super().__init__()
            self.label, self.inner = label, model

        def forward(self, tokens, sigma=None):
            return model(tokens, sigma, torch.full((tokens.shape[0],), self.label))

    settings = {"steps": 12, "corrector_steps": 2, "nucleus_p": 0.9}
    conditional = sampler(model, label=2, guidance=1.0, **settings).sample(8, seed=3)
    reference = sampler(Fixed(2), num_classes=0, **settings).sample(8, seed=3)
    assert torch.equal(conditional.tokens, reference.tokens)
    assert torch.equal(conditional.nfe_total, reference.nfe_total)
    plain = {"steps": 12, "corrector_steps": 0}
    unconditional = sampler(model, label=2, guidance=0.0, **plain).sample(8, seed=3)
    assert torch.equal(unconditional.tokens, sampler(Fixed(CLASSES), num_classes=0, **plain).sample(8, seed=3).tokens)


def test_the_corrector_runs_on_the_conditional_branch_and_guidance_costs_one_nfe_per_step():
    model = labelled_model()
    recorder = LabelRecorder(model)
    result = sampler(recorder, label=1, guidance=2.0, steps=6, corrector_steps=1, use_cache=False).sample(4, seed=0)
    denoiser = [c for c in recorder.calls if len(c) == 8]
    corrector = [c for c in recorder.calls if len(c) == 4]
    assert len(denoiser) == 6 and all(c.tolist() == [1] * 4 + [CLASSES] * 4 for c in denoiser)
    assert len(corrector) == 6 and all(c.tolist() == [1] * 4 for c in corrector)
    assert result.nfe_denoiser.tolist() == [6] * 4 and result.nfe_corrector.tolist() == [6] * 4
    # Block mode too: the guided denoiser, the conditional corrector.
    recorder.calls.clear()
    sampler(recorder, label=1, guidance=2.0, steps=4, block_length=8, corrector_steps=1).sample(2, seed=0)
    assert {tuple(c.tolist()) for c in recorder.calls} <= {(1, 1, CLASSES, CLASSES), (1, 1), (1,)}


def test_sampler_refuses_labels_a_model_does_not_have():
    model = labelled_model()
    with pytest.raises(ConfigError, match="choose one of 0..2"):
        sampler(model, label=3)
    with pytest.raises(ConfigError, match="needs a model trained on labels"):
        sampler(model, num_classes=0, label=0)
    with pytest.raises(ConfigError, match="needs sampling.label"):
        sampler(model, guidance=2.0)


# ---------------------------------------------------------------------------------------------
# Config errors


def problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(load_config(None, list(overrides)))
    return str(caught.value)


def test_bad_guidance_configs_are_refused_naming_the_field_and_the_fix():
    assert "set sampling.label too" in problems("data.labels=qed", "sampling.guidance=2")
    assert "model.family=llada has none" in problems("model.family=llada", "data.labels=qed")
    assert "data.labels is null" in problems("model.num_classes=2")
    assert "sampling.label=0 needs a model trained on labels" in problems("sampling.label=0")
    assert "choose one of them" in problems("data.labels=qed", "model.num_classes=2", "sampling.label=2")
    assert "diffusion.cond_dropout" in problems("diffusion.cond_dropout=1.5")
    validate(load_config(None, ["data.labels=qed", "sampling.label=1", "sampling.guidance=3"]))


def test_a_missing_or_mismatched_label_set_stops_training_before_any_process_group(labelled_shards, tmp_path):
    from pretrain.data.labels import LabelError
    from pretrain.train import train

    base = [f"data.shards={labelled_shards}", f"logging.run_dir={tmp_path / 'run'}"]
    with pytest.raises(LabelError, match="proseco label"):
        train(load_config(None, [*base, "data.labels=qed"]))
    with pytest.raises(UserError, match="model.num_classes=3 but the label set"):
        train(load_config(None, [*base, "data.labels=ring_count", "model.num_classes=3"]))
    with pytest.raises(ConfigError, match="sampling.label=5"):
        train(load_config(None, [*base, "data.labels=ring_count", "sampling.label=5"]))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# End to end: label a tiny SMILES folder, train 10 steps, sample and sweep with gamma > 0


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory) -> Path:
    if importlib.util.find_spec("rdkit") is None:
        pytest.skip("needs rdkit (pip install -e .[eval])")
    from pretrain.labeling import label_shards
    from tests.helpers import write_smiles_lines
    from tokenizer.shard import shard_corpus
    from tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("guidance")
    corpus = write_smiles_lines(root / "smiles.txt", 200)
    train_tokenizer(str(corpus), "char", root / "tok", line_documents=True)
    shard_corpus(str(corpus), root / "tok", seq_len=24, out=root / "shards", packing="pad", samples_per_shard=64,
                 workers=1, val_fraction=0.1, line_documents=True, content="smiles")
    label_shards(root / "shards", "ring_count", quantile=0.5)
    return root / "shards"


def test_labelled_run_trains_then_samples_and_sweeps_with_guidance(labelled_shards, tmp_path, capsys):
    from pretrain.checkpoint import load_model
    from pretrain.cli import main as cli_main
    from pretrain.sweep import read_rows

    run = tmp_path / "run"
    assert 0 == cli_main(["train", f"data.shards={labelled_shards}", f"logging.run_dir={run}", "data.labels=ring_count",
              "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.cond_dim=16",
              "data.global_batch_size=8", "data.micro_batch_size=8", "data.num_workers=0", "optim.warmup_steps=2",
              "optim.lr=3e-3", "train.max_steps=10", "train.eval_every=0", "train.eval_batches=1",
              "checkpoint.every=0", "logging.progress=false", "sampling.num_samples=2",
                         "sampling.batch_size=2", "sampling.steps=2"])
    model, cfg, _ = load_model(run)
    assert cfg.model.num_classes == 2 and cfg.data.labels == "ring_count"
    assert model.cond_map.embedding_table.weight.shape == (3, 16)
    out = tmp_path / "samples.jsonl"
    cli_main(["sample", "--checkpoint", str(run), "--out", str(out), "--num-samples", "4", "--steps", "8",
              "--corrector-steps", "1", "--class", "1", "--guidance", "2", "--device", "cpu"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and all(1 <= r["nfe_denoiser"] <= 8 and r["nfe_corrector"] == 8 for r in lines)
    cli_main(["sweep", "--checkpoint", str(run), "--out", str(tmp_path / "sweep"), "--steps", "4",
              "--corrector-steps", "0", "--class", "1", "--guidance", "1,3", "--num-samples", "4", "--no-novelty",
              "--device", "cpu"])
    rows = read_rows(tmp_path / "sweep" / "sweep.csv")
    assert [(r["label"], r["guidance"]) for r in rows] == [(1, 1.0), (1, 3.0)]
    assert "| class | gamma |" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert (tmp_path / "sweep" / "samples" / f"{cfg.name}_T4_S0_w1_g3.jsonl").exists()
    capsys.readouterr()
    assert cli_main(["sample", "--checkpoint", str(run), "--out", str(out), "--class", "2", "--device", "cpu"]) == 2
    assert "sampling.label=2 is not a class" in capsys.readouterr().err
    # The sweep reaches the sampler without validate(): the sampler's own check, printed as a config error.
    assert cli_main(["sweep", "--checkpoint", str(run), "--out", str(tmp_path / "bad"), "--steps", "4",
                     "--corrector-steps", "0", "--guidance", "2", "--num-samples", "2", "--device", "cpu"]) == 2
    assert "needs sampling.label" in capsys.readouterr().err
    _exports_and_imports_with_the_label_embedding(run, model, tmp_path)


def _exports_and_imports_with_the_label_embedding(run: Path, model: DiT, tmp_path: Path) -> None:
    """Both Hugging Face layouts hold the label embedding under the official name with cfg=true
    and cfg_num_classes; transformers on the folder gives our logits for each class and for none
    (the null class); importing it back gives every weight bit for bit."""
    from pretrain.checkpoint import load_model
    from pretrain.convert.hf_export import export_checkpoint
    from pretrain.convert.hf_import import import_folder
    from tests.test_convert import transformers_logits

    tokens = torch.randint(0, 5, (3, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert not torch.allclose(model(tokens, None, labels), model(tokens, None, None))  # the labels matter
    for layout in ("proseco-pretrain", "proseco-hf"):
        folder = tmp_path / layout
        export_checkpoint(run, folder, layout=layout)
        config = json.loads((folder / "config.json").read_text())
        assert (config["cfg"], config["cfg_num_classes"]) == (True, 2), layout
        vocab = config["vocab_size"]
        with torch.no_grad():
            for cond in (labels, None):
                expected = model(tokens, None, cond)[..., :vocab]
                got = transformers_logits(folder, tokens, cond=cond)
                assert torch.allclose(got, expected, atol=1e-5 * expected.abs().max().item()), (layout, cond)
        back, cfg, _ = load_model(import_folder(folder, tmp_path / f"back-{layout}").run_dir)
        assert cfg.model.num_classes == 2
        assert torch.equal(back.cond_map.embedding_table.weight, model.cond_map.embedding_table.weight), layout
