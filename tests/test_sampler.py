"""Sampler invariants on tiny and scripted models: masks, write-back, NFE accounting, caching,
blocks, prompts."""

import dataclasses

import pytest
import torch
from torch import nn

from pretrain.config import DiffusionConfig, SamplingConfig
from pretrain.diffusion import NoiseSchedule
from pretrain.models import ModelShape
from pretrain.models.dit.config import DiTConfig
from pretrain.models.dit.model import DiT
from pretrain.sampler import Sampler, nucleus, sample_categorical, write_back
from tests.test_model import randomise

VOCAB, MASK, L = 12, 11, 10
SCHEDULE = NoiseSchedule(DiffusionConfig())


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = DiT(DiTConfig(d_model=32, n_layers=2, n_heads=4, cond_dim=16), ModelShape(VOCAB, L))
    randomise(model, seed)
    return model


class Scripted(nn.Module):
    """Input-dependent but fully predictable: with masks in the input it predicts `denoise_token`
    everywhere; on a fully unmasked input (the corrector) it predicts min(token + 1, cap) per
    position, so a corrector loop reaches its fixed point after cap - min(y) updates."""

    def __init__(self, denoise_token=2, cap=5):
        super().__init__()
        self.denoise_token, self.cap = denoise_token, cap
        self.rows_forwarded = 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens, sigma):
        self.rows_forwarded += tokens.shape[0]
        has_mask = (tokens == MASK).any(-1, keepdim=True)
        target = torch.where(has_mask, torch.full_like(tokens, self.denoise_token),
                             torch.clamp(tokens + 1, max=self.cap))
        return torch.nn.functional.one_hot(target, VOCAB).float() * 40.0


def make_sampler(model, **overrides):
    cfg = dataclasses.replace(SamplingConfig(steps=8, batch_size=4, num_samples=4), **overrides)
    return Sampler(model, cfg, mask_id=MASK, vocab_size=VOCAB, seq_len=L, schedule=SCHEDULE)


def trace(sampler, num_samples=4, prompt=None, seed=0):
    states = []
    result = sampler.sample(num_samples, prompt=prompt, seed=seed,
                            progress=lambda step, total, x: states.append(x.clone()))
    return result, states


def test_no_mask_left_when_finalising():
    result, _ = trace(make_sampler(tiny_model(), steps=3, denoise_final=True), num_samples=8)
    assert not (result.tokens == MASK).any()
    assert result.tokens.max() < MASK


class Wrapped(nn.Module):
    """Any denoiser: the sampler knows nothing of the module but its forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, tokens, sigma):
        return self.inner(tokens, sigma)


def test_scores_are_as_wide_as_the_model_output():
    """A model with padding rows past the vocabulary (as for tensor parallelism): the sampler sizes
    its scores from the forward's output and never draws a padding id."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(d_model=32, n_layers=2, n_heads=4, cond_dim=16), ModelShape(VOCAB + 4, L))
    randomise(model, 0)
    result, _ = trace(make_sampler(Wrapped(model), steps=4, corrector_steps=2, denoise_final=True), num_samples=4)
    assert result.tokens.max() < MASK and result.nfe_corrector.min() >= 1


def test_unmasked_tokens_change_only_inside_corrector_loops():
    sampler = make_sampler(tiny_model(), steps=12, corrector_steps=2, corrector_every=3)
    start = torch.full((4, L), MASK)
    result, states = trace(sampler)
    before = start
    changed_steps = []
    for step, after in enumerate(states, start=1):
        was_unmasked = before != MASK
        if (after[was_unmasked] != before[was_unmasked]).any():
            changed_steps.append(step)
        before = after
    assert set(changed_steps) <= {3, 6, 9, 12}
    plain, plain_states = trace(make_sampler(tiny_model(), steps=12))
    previous = torch.full((4, L), MASK)
    for after in plain_states:
        kept = previous != MASK
        assert torch.equal(after[kept], previous[kept])
        previous = after


def test_write_back_touches_only_previously_unmasked_positions():
    x = torch.tensor([[MASK, 3, 4, MASK, 5]])
    y = torch.tensor([[7, 7, 7, 7, 7]])
    fixed = torch.tensor([[False, False, True, False, False]])
    assert write_back(x, y, fixed, MASK).tolist() == [[MASK, 7, 4, MASK, 7]]


def test_denoiser_nfe_counts_only_steps_whose_input_changed():
    model = Scripted(denoise_token=2)
    result, states = trace(make_sampler(model, steps=12, batch_size=3), num_samples=3)
    x_at_start = [torch.full((3, L), MASK)] + states[:-1]
    for row in range(3):
        expected = 1 + sum(int(not torch.equal(x_at_start[i][row], x_at_start[i - 1][row])) for i in range(1, 12))
        assert result.nfe_denoiser[row].item() == expected < 12
    assert model.rows_forwarded == int(result.nfe_total.sum())


def test_corrector_nfe_counts_forwards_until_the_fixed_point():
    """Per loop, one corrector forward per distinct input until the fixed point, at most S."""
    model = Scripted(denoise_token=2, cap=5)
    sampler = make_sampler(model, steps=2, corrector_steps=10, corrector_every=2, batch_size=3)
    result = sampler.sample(3)
    # The loop starts from y = 2 everywhere (the denoiser's argmax, and 2s carried over), climbs
    # 2 -> 3 -> 4 -> 5 and confirms 5: 4 forwards, far below S = 10.
    assert result.nfe_corrector.tolist() == [4, 4, 4]
    assert model.rows_forwarded == int(result.nfe_total.sum())


def test_corrector_budget_caps_the_loop():
    model = Scripted(denoise_token=2, cap=9)
    result, _ = trace(make_sampler(model, steps=4, corrector_steps=3, corrector_every=4), num_samples=2)
    assert result.nfe_corrector.tolist() == [3, 3]  # 2 -> 3 -> 4 -> 5, never converged within S = 3


def test_caching_never_changes_the_result():
    for overrides in ({}, {"corrector_steps": 3, "corrector_every": 2}, {"nucleus_p": 0.8, "corrector_steps": 2,
                                                                         "corrector_sampling": "sample"}):
        cached = make_sampler(tiny_model(1), steps=16, use_cache=True, **overrides).sample(6, seed=3)
        uncached = make_sampler(tiny_model(1), steps=16, use_cache=False, **overrides).sample(6, seed=3)
        assert torch.equal(cached.tokens, uncached.tokens)
        assert (cached.nfe_total <= uncached.nfe_total).all()
        assert (uncached.nfe_denoiser == 16).all()


def test_select_top_k_changes_at_most_k_positions():
    model = tiny_model(2)
    sampler = make_sampler(model, steps=6, corrector_steps=1, corrector_sampling="select_top_k", corrector_top_k=1)
    probs = torch.softmax(torch.randn(3, L, VOCAB), -1)
    y = torch.randint(0, MASK, (3, L))
    updated = sampler._corrector_update(probs, y, torch.Generator().manual_seed(0))
    assert ((updated != y).sum(-1) <= 1).all()
    assert torch.equal(updated.gather(1, (updated != y).float().argmax(-1, keepdim=True)),
                       probs.argmax(-1).gather(1, (updated != y).float().argmax(-1, keepdim=True))) or \
        (updated == y).all()


def test_nucleus_keeps_top_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(nucleus(probs, 0.85), torch.tensor([[0.5, 0.3, 0.0, 0.0]]) / 0.8)
    assert torch.allclose(nucleus(probs, 0.1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_prompt_prefix_never_changes():
    prompt = torch.tensor([1, 2, 3])
    for overrides in ({"corrector_steps": 3}, {"block_length": 7, "steps": 7, "corrector_steps": 2}):
        result, states = trace(make_sampler(tiny_model(), **overrides), prompt=prompt)
        for x in states:
            assert (x[:, :3] == prompt).all()


def test_block_mode_never_selects_future_blocks_and_fills_each_block():
    sampler = make_sampler(tiny_model(), block_length=5, steps=10, corrector_steps=2, corrector_every=2)
    result, states = trace(sampler)
    for step, x in enumerate(states, start=1):
        block = (step - 1) // 5
        assert (x[:, (block + 1) * 5:] == MASK).all()  # later blocks untouched
        assert ((x[:, block * 5:(block + 1) * 5] != MASK).sum(-1) == (step - block * 5)).all()  # one per step
    assert not (result.tokens == MASK).any()


def test_block_corrector_stops_at_fixed_point():
    model = Scripted(denoise_token=5, cap=5)
    sampler = make_sampler(model, block_length=5, steps=10, corrector_steps=6, corrector_every=1, batch_size=2)
    result = sampler.sample(2)
    # y = 5 everywhere from the start: the first corrector pass confirms it (counted) and stops.
    assert result.nfe_corrector.tolist() == [10, 10] and result.nfe_denoiser.tolist() == [10, 10]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_categorical_draws_follow_the_probabilities(dtype):
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0], dtype=dtype).expand(200_000, 6)
    draws = sample_categorical(probs * 3.0, torch.Generator().manual_seed(0))  # unnormalised is fine
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert freq[[0, 2, 5]].sum() == 0  # zero-probability tokens are never drawn
    assert torch.allclose(freq, probs[0].double(), atol=0.005)


class Confident(nn.Module):
    """Position i's distribution puts probability increasing with i on token 1 (the rest spread
    over tokens 0..3): the most confident masked positions are the last ones."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens, sigma):
        logits = torch.zeros(*tokens.shape, VOCAB)
        logits[..., 4:] = -1e4
        logits[..., 1] = torch.arange(tokens.shape[1], dtype=torch.float32)
        return logits


def test_confidence_unmasking_follows_the_schedule_most_confident_first():
    """unmasking=confidence: each step unmasks all but round(masked * mc_s/mc_t) positions, never
    leaves a mask, and picks positions by the probability of their drawn token."""
    sampler = make_sampler(Confident(), steps=5, unmasking="confidence")
    result, states = trace(sampler, num_samples=4)
    masked = [L] + [int((x == MASK).sum(-1)[0]) for x in states]
    times = torch.linspace(1.0, 1e-5, 6, dtype=torch.float64).tolist()
    for i in range(5):
        assert ((states[i] == MASK).sum(-1) == masked[i + 1]).all()  # the same count in every sample
        assert masked[i + 1] == int(masked[i] * sampler._keep_masked(times[i], times[i + 1]) + 0.5)
    assert masked[-1] == 0 and not (result.tokens == MASK).any()
    # The drawn token's probability grows with the position: positions unmask from the right,
    # except where a draw of a less likely token lowers a position's confidence.
    first = states[0] != MASK
    assert first[:, L // 2:].sum() > first[:, : L // 2].sum()


def test_confidence_unmasking_with_a_corrector_and_the_cache():
    """Corrector loops run with confidence unmasking (the step's unmasking from the corrector's
    distribution), write back only to earlier positions, and T beyond the tokens to unmask costs
    no NFE on steps that unmask nothing."""
    result, states = trace(make_sampler(Scripted(), steps=32, unmasking="confidence", corrector_steps=2))
    assert not (result.tokens == MASK).any()
    assert (result.nfe_denoiser < 32).all()  # steps with a zero quota reuse the forward
    counts = [int((x == MASK).sum(-1)[0]) for x in states]
    assert counts == sorted(counts, reverse=True)


def test_official_nucleus_cache_refilters_at_every_reuse():
    """nucleus_cache=official filters a reused distribution again (sharper at each hit); `once`
    draws from the same filtered distribution however often the forward is reused."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    once = nucleus(probs, 0.9)
    twice = nucleus(once, 0.9)
    assert torch.count_nonzero(once) == 2 and torch.count_nonzero(twice) == 1  # compounding
    sampler = make_sampler(tiny_model(), nucleus_p=0.9, nucleus_cache="official")
    scores = torch.log(probs).repeat(3, 1)
    got = sampler._probs(scores, torch.tensor([1, 2, 3]))
    assert torch.allclose(got[0], once[0]) and torch.allclose(got[1], twice[0])
    assert torch.allclose(got[2], nucleus(twice, 0.9)[0])
    # End to end: with T far above L the cache is hit often, and the two semantics then differ;
    # without nucleus filtering they are identical.
    kwargs = dict(steps=64, nucleus_p=0.5)
    official = make_sampler(tiny_model(), nucleus_cache="official", **kwargs).sample(16, seed=3)
    plain = make_sampler(tiny_model(), **kwargs).sample(16, seed=3)
    assert not torch.equal(official.tokens, plain.tokens)
    same = [make_sampler(tiny_model(), steps=64, nucleus_cache=mode).sample(8, seed=3).tokens
            for mode in ("official", "once")]
    assert torch.equal(*same)


def test_early_eos_stop_ends_a_sample_at_a_block_that_ends_in_eos():
    """early_eos_stop: a sample whose finished block ends in EOS is filled with EOS and spends no
    more forwards; without it, every block is generated."""
    eos = 3

    class EndsAtFirstBlock(nn.Module):
        """Predicts token 0 everywhere but EOS at position 4, the first block's last."""

        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, tokens, sigma):
            logits = torch.zeros(*tokens.shape, VOCAB)
            logits[..., 0] = 5.0
            logits[:, 4, eos] = 50.0
            return logits

    kwargs = dict(steps=10, block_length=5, batch_size=4)
    cfg = dataclasses.replace(SamplingConfig(num_samples=4), early_eos_stop=True, **kwargs)
    sampler = Sampler(EndsAtFirstBlock(), cfg, mask_id=MASK, vocab_size=VOCAB, seq_len=L, schedule=SCHEDULE,
                      eos_id=eos)
    result = sampler.sample(4)
    assert (result.tokens[:, :4] == 0).all() and (result.tokens[:, 4] == eos).all()
    assert (result.tokens[:, 5:] == eos).all() and (result.nfe_denoiser == 5).all()
    full = Sampler(EndsAtFirstBlock(), dataclasses.replace(cfg, early_eos_stop=False), mask_id=MASK,
                   vocab_size=VOCAB, seq_len=L, schedule=SCHEDULE, eos_id=eos).sample(4)
    assert (full.nfe_denoiser == 10).all() and not (full.tokens == MASK).any()
    with pytest.raises(ValueError, match="EOS id"):
        Sampler(EndsAtFirstBlock(), cfg, mask_id=MASK, vocab_size=VOCAB, seq_len=L, schedule=SCHEDULE).sample(1)
