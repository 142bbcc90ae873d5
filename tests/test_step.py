"""The ProSeCo step: two-pass equals reuse, pass 1 is gradient- and activation-free, learning works."""

import pytest
import torch

from parallel.runner import LocalRunner
from pretrain.config import DiffusionConfig
from pretrain.diffusion import mask_tokens, suppress_logits
from pretrain.models import ModelShape
from pretrain.models.dit.config import DiTConfig as ModelConfig
from pretrain.models.dit.model import DiT
from pretrain.step import Objective, forward_backward
from tests.test_model import randomise

VOCAB, MASK, L = 24, 23, 16
CFG = ModelConfig(d_model=48, n_layers=2, n_heads=4, cond_dim=16)


def make_batch(batch_size=6, seed=0, first_position=0):
    generator = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, MASK, (batch_size, L), generator=generator),
            "position": torch.arange(first_position, first_position + batch_size),
            "valid": torch.ones(batch_size, dtype=torch.bool)}


def objective(**overrides) -> Objective:
    return Objective.build(DiffusionConfig(**overrides), mask_id=MASK, vocab_size=VOCAB, seed=11, global_batch_size=6)


def loss_and_grads(model, batch, obj, mode):
    model.zero_grad()
    tokens = batch["tokens"].numel()
    metrics = forward_backward(LocalRunner(model), [batch], obj, step=0, mode=mode, backward_scale=1.0 / tokens)
    return metrics.loss / tokens, {n: p.grad.clone() for n, p in model.named_parameters()}


def run(model, batch, obj, step, mode):
    """One training micro-batch of the objective through the one-process runner."""
    return forward_backward(LocalRunner(model), [batch], obj, step=step, mode=mode, backward_scale=1.0)


@pytest.mark.parametrize("corrector_input", ["all", "masked"])
def test_two_pass_equals_reuse(corrector_input):
    torch.manual_seed(0)
    model = DiT(CFG, ModelShape(VOCAB, L))
    randomise(model)
    obj = objective(corrector_input=corrector_input)
    batch = make_batch()
    loss_reuse, grads_reuse = loss_and_grads(model, batch, obj, "reuse")
    loss_two, grads_two = loss_and_grads(model, batch, obj, "two_pass")
    assert torch.allclose(loss_reuse, loss_two, rtol=1e-6)
    for name in grads_reuse:
        assert torch.allclose(grads_reuse[name], grads_two[name], rtol=1e-5, atol=1e-7), name


class Recorder(torch.nn.Module):
    """Wraps the model: records each call's batch size and grad mode, and counts tensors saved
    for backward during that call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, tokens, sigma):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            out = self.model(tokens, sigma)
        self.calls.append((tokens.shape[0], torch.is_grad_enabled(), len(saved), out.requires_grad))
        return out


def test_pass_one_has_no_gradient_and_stores_no_activations():
    model = DiT(CFG, ModelShape(VOCAB, L))
    randomise(model)
    recorder = Recorder(model)
    run(recorder, make_batch(), objective(), step=0, mode="two_pass")
    (b1, grad1, saved1, req1), (b2, grad2, saved2, req2) = recorder.calls
    assert (b1, grad1, saved1, req1) == (6, False, 0, False)
    assert (b2, grad2, req2) == (12, True, True) and saved2 > 0

    recorder.calls.clear()
    run(recorder, make_batch(), objective(), step=0, mode="reuse")
    assert [(c[0], c[1]) for c in recorder.calls] == [(6, True), (6, True)]


def test_corrector_start_step_gives_plain_mdlm_before():
    model = DiT(CFG, ModelShape(VOCAB, L))
    randomise(model)
    recorder = Recorder(model)
    obj = objective(corrector_training_start_step=5)
    before = run(recorder, make_batch(), obj, step=4, mode="reuse")
    assert len(recorder.calls) == 1 and before.corrector.abs().sum() == 0
    run(recorder, make_batch(), obj, step=5, mode="reuse")
    assert len(recorder.calls) == 3


def test_tiny_model_memorises_eight_sequences():
    """On 8 memorised sequences the denoiser and the corrector become (nearly) exact wherever the
    visible half of a sequence identifies it, and the validation NELBO falls towards log(8)/L."""
    torch.manual_seed(0)
    model = DiT(ModelConfig(d_model=64, n_layers=2, n_heads=4, cond_dim=32), ModelShape(VOCAB, L))
    data = make_batch(batch_size=8, seed=3)
    tokens = data["tokens"].repeat(4, 1)  # every step sees each sequence under 4 different masks
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    obj = Objective.build(DiffusionConfig(), mask_id=MASK, vocab_size=VOCAB, seed=0, global_batch_size=32)
    for step in range(400):
        batch = {"tokens": tokens, "valid": torch.ones(32, dtype=torch.bool),
                 "position": torch.arange(32 * step, 32 * step + 32)}
        optimizer.zero_grad()
        forward_backward(LocalRunner(model), [batch], obj, step=step, mode="reuse", backward_scale=1.0 / tokens.numel())
        optimizer.step()
    model.eval()
    with torch.no_grad():
        # Half of each sequence masked: the rest identifies it, so both passes should be exact.
        zt = mask_tokens(data["tokens"], torch.full((8,), 0.5), MASK, seed=9, positions=torch.arange(8))
        masked = zt == MASK
        denoised = suppress_logits(model(zt), MASK, VOCAB).argmax(-1)
        y = torch.where(masked, denoised, data["tokens"])
        corrected = suppress_logits(model(y), MASK, VOCAB).argmax(-1)
        validation = Objective.build(DiffusionConfig(), mask_id=MASK, vocab_size=VOCAB, seed=1, global_batch_size=8)
        runner = LocalRunner(model)
        sums = [forward_backward(runner, [{**data, "position": torch.arange(8 * k, 8 * k + 8)}], validation, step=0)
                for k in range(20)]
        nelbo = sum((m.mdlm / m.tokens).item() for m in sums) / 20
    assert (denoised[masked] == data["tokens"][masked]).float().mean() > 0.9
    assert (corrected == data["tokens"]).float().mean() > 0.98
    assert nelbo < 0.7  # from about 3.2 at initialisation; the floor is log(8)/16 = 0.13


def chunked(chunk: int, **overrides) -> Objective:
    return objective(loss_chunk_tokens=chunk, **overrides)


@pytest.mark.parametrize("mode", ["reuse", "two_pass"])
@pytest.mark.parametrize("overrides", [{}, {"corrector_prior": "sample", "corrector_input": "masked"},
                                       {"corrector_training": False}, {"corrector_errors_upweighted": False}],
                         ids=["joint", "sampled-masked", "mdlm", "plain-corrector"])
def test_chunked_loss_equals_whole_logits(mode, overrides):
    """Chunks of 7 and 40 tokens (neither divides the 96 tokens of a micro-batch, nor 192 of a
    two-pass batch) and one chunk give the whole-logits metrics exactly (argmaxes and draws
    included) and its loss and gradients to fp32 rounding."""
    torch.manual_seed(0)
    model = DiT(CFG, ModelShape(32, L))  # padded past the real vocabulary, as under tensor parallelism
    randomise(model)
    batch = make_batch()
    tokens = batch["tokens"].numel()

    def step(obj):
        model.zero_grad()
        metrics = forward_backward(LocalRunner(model), [batch], obj, step=0, mode=mode, backward_scale=1.0 / tokens)
        return metrics, {n: p.grad.clone() for n, p in model.named_parameters()}

    whole, whole_grads = step(chunked(0, **overrides))
    scale = max(g.abs().max() for g in whole_grads.values())
    assert scale > 0
    for size in (7, 40, 4096):
        metrics, grads = step(chunked(size, **overrides))
        assert torch.allclose(metrics.loss, whole.loss, rtol=1e-6)
        for name in ("mdlm", "corrector"):
            assert torch.allclose(getattr(metrics, name), getattr(whole, name), rtol=1e-6, atol=1e-6), name
        for name in ("input_errors", "output_errors", "tokens"):
            assert torch.equal(getattr(metrics, name), getattr(whole, name)), name
        for name in whole_grads:
            assert (grads[name] - whole_grads[name]).abs().max() <= 2e-6 * scale, (size, name)
    assert not model.emit_features  # the model gives logits again after the step


def test_chunked_loss_never_saves_logits_nor_redoes_argmaxes(monkeypatch):
    """With chunks, no logits (tokens x vocabulary) are saved for backward (each chunk's are
    recomputed from the features), and the recomputation stops at the loss: pass 1's draw and the corrector's
    argmax run once per chunk, not again in backward."""
    import pretrain.step as step_module

    calls = {"draw": 0, "argmax": 0}
    real_draw, real_argmax = step_module.draw_corrector_input, step_module.vocab_argmax

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(step_module, "draw_corrector_input", counting("draw", real_draw))
    monkeypatch.setattr(step_module, "vocab_argmax", counting("argmax", real_argmax))
    model = DiT(CFG, ModelShape(VOCAB, L))
    randomise(model)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        run(model, make_batch(), chunked(7), step=0, mode="reuse")
    chunks = -(-6 * L // 7)
    assert calls == {"draw": chunks, "argmax": chunks}
    assert saved and not [s for s in saved if len(s) > 1 and s[-1] == VOCAB]

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        run(model, make_batch(), chunked(0), step=0, mode="reuse")
    assert [s for s in saved if len(s) > 1 and s[-1] == VOCAB]  # the whole-logits path does keep them


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_projection_and_cross_entropy_equal_autograds(precision):
    """projected_nll (the chunked loss's projection and cross entropy in one function that saves no
    logits) gives what F.linear + cross_entropy give, suppressed ids included: the loss, the logits
    it hands out for the argmax, and the gradients of the features, the head's weight and bias,
    under a per-token upstream gradient; under bf16 autocast the same low-precision products."""
    from parallel.tensor import projected_nll
    from pretrain.diffusion import suppression_bias

    torch.manual_seed(0)
    tokens, d, rows, vocab = 37, 16, 48, 40  # rows past the real vocabulary are padding, as under tp
    head = torch.nn.Linear(d, rows)
    features = torch.randn(tokens, d, requires_grad=True)
    target = torch.randint(0, vocab - 1, (tokens,))
    upstream = torch.rand(tokens)  # per-token loss weights, as the ELBO's
    bias = suppression_bias(rows, vocab - 1, vocab, "cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def grads(nll):
        (nll * upstream).sum().backward()
        out = [t.grad.clone() for t in (features, head.weight, head.bias)]
        for t in (features, head.weight, head.bias):
            t.grad = None
        return out

    with autocast:
        reference_logits = (head(features) + bias.to(torch.bfloat16 if precision == "bf16" else torch.float32)).float()
        reference = torch.nn.functional.cross_entropy(reference_logits, target, reduction="none")
    reference_grads = grads(reference)
    with autocast:
        nll, logits = projected_nll(features, head, bias, target)
    assert not logits.requires_grad and logits.dtype == torch.float32
    assert torch.equal(logits.argmax(-1), reference_logits.argmax(-1))
    tolerance = 1e-6 if precision == "fp32" else 2e-2
    assert torch.allclose(nll, reference, rtol=tolerance, atol=tolerance)
    for got, expected in zip(grads(nll), reference_grads):
        assert got.dtype == expected.dtype
        assert (got - expected).abs().max() <= tolerance * expected.abs().max()
