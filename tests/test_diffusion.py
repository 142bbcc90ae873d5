"""The noise schedules and every switch of the ProSeCo loss, against hand computations."""

import math

import pytest
import torch

from parallel.rng import keyed_uniform
from pretrain.config import DiffusionConfig
from pretrain.diffusion import (
    Noised,
    NoiseSchedule,
    corrector_input,
    draw_corrector_input,
    loss_weight,
    mask_tokens,
    proseco_losses,
    sample_t,
    suppress_logits,
    suppression_bias,
)

MASK = 3
VOCAB = 4


def log_softmax(row):
    """Plain-Python log-softmax over the real tokens (the mask entry, last, is excluded)."""
    real = row[:MASK]
    top = max(real)
    lse = top + math.log(sum(math.exp(v - top) for v in real))
    return [v - lse for v in real]


# One sequence of 3 tokens, mask id 3. Position 0 and 2 are masked in z_t. The large logits on the
# mask id must be ignored everywhere (the mask can never be predicted).
X0 = [0, 2, 1]
ZT = [MASK, 2, MASK]
LOGITS_ZT = [[1.0, 2.0, 0.0, 5.0], [0.0, 3.0, 1.0, 9.0], [2.0, 1.0, 0.0, 0.0]]
LOGITS_Y = [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0]]
W = 2.0  # the MDLM weight 1/t at t = 0.5


def scores(logits) -> torch.Tensor:
    """The logits as the step hands them to the objective: mask suppressed."""
    return suppress_logits(torch.tensor([logits]), MASK, VOCAB)


def noised() -> Noised:
    return Noised(x0=torch.tensor([X0]), zt=torch.tensor([ZT]), sigma=torch.tensor([0.7]), weight=torch.tensor([W]),
                  token_mask=torch.ones(1, 3))


def expected_mdlm():
    return [-W * log_softmax(LOGITS_ZT[0])[X0[0]], 0.0, -W * log_softmax(LOGITS_ZT[2])[X0[2]]]


@pytest.mark.parametrize("corrector_input_mode", ["all", "masked"])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("upweighted", [True, False])
def test_loss_switches_match_hand_computation(corrector_input_mode, weighted, upweighted):
    cfg = DiffusionConfig(corrector_input=corrector_input_mode, weighted_corrector_loss=weighted,
                          corrector_errors_upweighted=upweighted, mdlm_loss_weight=0.7, corrector_loss_weight=1.3)
    n = noised()
    y = corrector_input(scores(LOGITS_ZT), n, cfg, MASK, seed=0, positions=torch.tensor([0]))
    # argmax over real tokens: [1, 1, 0]; "masked" keeps the clean token at the unmasked position 1.
    expected_y = [1, 1, 0] if corrector_input_mode == "all" else [1, 2, 0]
    assert y.tolist() == [expected_y]

    losses = proseco_losses(scores(LOGITS_ZT), scores(LOGITS_Y), y, n, cfg, MASK)
    mdlm = expected_mdlm()
    corrector = []
    for pos in range(3):
        log_p = log_softmax(LOGITS_Y[pos])[X0[pos]]
        wrong = expected_y[pos] != X0[pos]
        term = -log_p if (wrong or not upweighted) else -math.exp(log_p)
        corrector.append((W if weighted else 1.0) * term)
    total = [0.7 * m + 1.3 * c for m, c in zip(mdlm, corrector)]
    assert losses.mdlm[0].tolist() == pytest.approx(mdlm, rel=1e-6)
    assert losses.corrector[0].tolist() == pytest.approx(corrector, rel=1e-6)
    assert losses.total[0].tolist() == pytest.approx(total, rel=1e-6)
    assert losses.corrector_input_errors[0].tolist() == [float(a != b) for a, b in zip(expected_y, X0)]
    # corrector argmax: [1, 2, 1] against x0 [0, 2, 1]
    assert losses.corrector_output_errors[0].tolist() == [1.0, 0.0, 0.0]


def test_plain_mdlm_branch_ignores_scalar_weights():
    """Before corrector_training_start_step the official code falls through to unscaled MDLM."""
    cfg = DiffusionConfig(mdlm_loss_weight=0.5)
    losses = proseco_losses(scores(LOGITS_ZT), None, None, noised(), cfg, MASK)
    assert losses.total[0].tolist() == pytest.approx(expected_mdlm(), rel=1e-6)
    assert losses.corrector.abs().sum() == 0


def test_invalid_samples_contribute_nothing():
    n = noised()
    n.token_mask = torch.zeros(1, 3)
    cfg = DiffusionConfig()
    y = torch.tensor([[1, 1, 0]])
    losses = proseco_losses(scores(LOGITS_ZT), scores(LOGITS_Y), y, n, cfg, MASK)
    assert losses.total.abs().sum() == 0 and losses.corrector_input_errors.sum() == 0


def test_sampled_corrector_input_follows_the_softmax():
    cfg = DiffusionConfig(corrector_prior="sample")
    logits = torch.tensor([0.0, 1.0, 2.0, 50.0]).expand(1, 20000, 4)  # the huge mask logit must never win
    n = Noised(x0=torch.zeros(1, 20000, dtype=torch.long), zt=torch.full((1, 20000), MASK), sigma=torch.ones(1),
               weight=torch.ones(1), token_mask=torch.ones(1, 20000))
    y = corrector_input(suppress_logits(logits, MASK, VOCAB), n, cfg, MASK, seed=5, positions=torch.tensor([7]))
    freq = torch.bincount(y.flatten(), minlength=VOCAB).float() / y.numel()
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    assert freq[MASK] == 0
    assert torch.allclose(freq[:MASK], expected, atol=0.015)
    again = corrector_input(suppress_logits(logits, MASK, VOCAB), n, cfg, MASK, seed=5, positions=torch.tensor([7]))
    assert torch.equal(y, again)  # keyed: reproducible


@pytest.mark.parametrize("corrector_input_mode", ["all", "masked"])
def test_corrector_input_of_any_chunk_of_tokens_is_that_of_the_batch(corrector_input_mode):
    """The chunked loss draws y from a few flattened tokens at a time: keyed by each token's
    sample position and index, every chunk draws bit for bit what the whole batch draws there."""
    cfg = DiffusionConfig(corrector_prior="sample", corrector_input=corrector_input_mode)
    generator = torch.Generator().manual_seed(0)
    rows, length, vocab = 3, 5, 6
    scores = suppress_logits(torch.randn(rows, length, vocab, generator=generator), MASK, VOCAB)
    x0 = torch.randint(0, MASK, (rows, length), generator=generator)
    zt = torch.where(torch.rand(rows, length, generator=generator) < 0.5, MASK, x0)
    n = Noised(x0=x0, zt=zt, sigma=torch.ones(rows), weight=torch.ones(rows), token_mask=torch.ones(rows, length))
    positions = torch.tensor([4, 9, 2])
    whole = corrector_input(scores, n, cfg, MASK, seed=5, positions=positions).flatten()
    sample_position = positions[:, None].expand(rows, length).flatten()
    token_index = torch.arange(length)[None].expand(rows, length).flatten()
    flat = scores.flatten(0, 1)
    drawn = torch.cat([draw_corrector_input(flat[s], x0.flatten()[s], zt.flatten()[s], sample_position[s],
                                            token_index[s], cfg, MASK, seed=5)
                       for s in (slice(0, 4), slice(4, 11), slice(11, 15))])
    assert torch.equal(drawn, whole)
    assert suppression_bias(vocab, MASK, VOCAB, "cpu").tolist() == [0, 0, 0, -1e6, -1e6, -1e6]


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9, 0.999])
def test_loglinear_weight_is_one_over_t(t):
    sigma, dsigma = NoiseSchedule(DiffusionConfig(noise_schedule="loglinear"))(torch.tensor([t], dtype=torch.float64))
    assert loss_weight(sigma, dsigma).item() == pytest.approx(1.0 / t, rel=1e-9)


@pytest.mark.parametrize("kind", ["loglinear", "linear", "cosine", "geometric"])
def test_schedule_derivative_matches_finite_difference(kind):
    schedule = NoiseSchedule(DiffusionConfig(noise_schedule=kind))
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    h = 1e-6
    numeric = (schedule(t + h)[0] - schedule(t - h)[0]) / (2 * h)
    assert torch.allclose(schedule(t)[1], numeric, rtol=1e-5)
    move = schedule.move_chance(t)
    assert torch.all(move[1:] > move[:-1]) and torch.all((move > 0) & (move < 1))


def test_loglinear_mask_probability_is_t():
    schedule = NoiseSchedule(DiffusionConfig(noise_schedule="loglinear", schedule_eps=1e-3))
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(schedule.move_chance(t), (1 - 1e-3) * t)


def test_antithetic_t_is_stratified_over_the_global_batch_and_layout_free():
    positions = torch.arange(64, 128)  # the second global batch of 64
    t = sample_t(seed=3, positions=positions, global_batch_size=64, eps=0.1, antithetic=True)
    u = (t - 0.1) / 0.9
    slots = (u * 64).floor().long()
    assert sorted(slots.tolist()) == list(range(64))  # one sample in every stratum
    # Any split into micro-batches or ranks gives the same values for the same positions.
    parts = torch.cat([sample_t(3, p, 64, 0.1, True) for p in positions.split(16)])
    assert torch.equal(parts, t)
    assert t.min() >= 0.1 and t.max() <= 1.0


def test_masking_rate_and_keying():
    x0 = torch.zeros(4096, 64, dtype=torch.long)
    positions = torch.arange(4096)
    move = torch.full((4096,), 0.3)
    zt = mask_tokens(x0, move, mask_id=9, seed=1, positions=positions)
    assert abs((zt == 9).float().mean().item() - 0.3) < 0.005
    assert torch.equal(zt[100:200], mask_tokens(x0[100:200], move[100:200], 9, 1, positions[100:200]))
    assert not torch.equal(zt, mask_tokens(x0, move, 9, 2, positions))


def test_keyed_uniform_is_uniform_and_distinct_per_stream():
    u = keyed_uniform(0, 1, torch.arange(100000))
    assert abs(u.mean().item() - 0.5) < 0.005 and u.min() >= 0 and u.max() < 1
    v = keyed_uniform(0, 2, torch.arange(100000))
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.01
    big = keyed_uniform(0, 1, torch.tensor([2**40 + 5, 5]))
    assert big[0] != big[1]  # the high word of 64-bit positions matters
