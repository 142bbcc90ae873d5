"""Absorbing-state masked diffusion: noise schedules, masking, the MDLM and ProSeCo losses.

Notation (proseco-method.md): alpha_t = exp(-sigma(t)) is the probability that a token is still
clean at time t, so it is masked with probability 1 - exp(-sigma(t)). The MDLM loss at a masked
position is -log p(x0 | z_t) times dsigma / expm1(sigma), which is exactly 1/t for the loglinear
schedule. Every loss here is returned per token and summed by the caller, which divides by the
number of tokens of the whole global batch (the official reduction, made layout independent).

Supervised fine-tuning (a batch with ``prompt_length``, from a shard folder written with
``--packing sft``) follows LLaDA's SFT: the prompt is never masked and never in either loss (the
corrector's input keeps it too), and each sample's terms are divided by its response length
(`response_weights`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from parallel.rng import STREAM_CORRECTOR_SAMPLE, STREAM_MASK, STREAM_T, keyed_gumbel, keyed_uniform
from parallel.tensor import add_vocab_bias, local_scores, vocab_argmax, vocab_cross_entropy, vocab_index, with_local
from pretrain.config import DiffusionConfig

NEG_INF = -1e6  # the official code's "minus infinity" for the mask logit (finite: no NaN in softmax)


class NoiseSchedule:
    """sigma(t) and dsigma/dt for t in [0, 1]."""

    def __init__(self, cfg: DiffusionConfig):
        self.kind, self.eps = cfg.noise_schedule, cfg.schedule_eps
        self.sigma_min, self.sigma_max = cfg.sigma_min, cfg.sigma_max

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.eps
        if self.kind == "loglinear":  # alpha_t = 1 - (1 - eps) t
            return -torch.log1p(-(1 - eps) * t), (1 - eps) / (1 - (1 - eps) * t)
        if self.kind == "linear":
            rate = self.sigma_max - self.sigma_min
            return self.sigma_min + t * rate, torch.full_like(t, rate)
        if self.kind == "geometric":
            sigma = self.sigma_min ** (1 - t) * self.sigma_max ** t
            return sigma, sigma * math.log(self.sigma_max / self.sigma_min)
        if self.kind == "cosine":  # alpha_t = eps + (1 - eps) cos(pi t / 2)
            cos = eps + (1 - eps) * torch.cos(t * math.pi / 2)
            return -torch.log(cos), (1 - eps) * torch.sin(t * math.pi / 2) * (math.pi / 2) / cos
        raise ValueError(f"unknown noise schedule {self.kind}")

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - alpha_t."""
        return -torch.expm1(-self(t)[0])


def loss_weight(sigma: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
    """-alpha'_t / (1 - alpha_t) = dsigma / expm1(sigma): the MDLM ELBO weight (1/t for loglinear)."""
    return dsigma / torch.expm1(sigma)


def sample_t(seed: int, positions: torch.Tensor, global_batch_size: int, eps: float, antithetic: bool) -> torch.Tensor:
    """Noise level per sample in [eps, 1], keyed by the sample's global stream position.

    Antithetic (stratified) sampling as upstream, over the global batch instead of each device's
    batch: the sample in slot j = position mod B draws from the stratum [j/B, (j+1)/B). So t does not
    depend on how the global batch is split over ranks and micro-batches.
    """
    u = keyed_uniform(seed, STREAM_T, positions).double()
    if antithetic:
        slot = (positions % global_batch_size).double()
        u = (u + slot) / global_batch_size
    return ((1 - eps) * u + eps).float()


def mask_tokens(x0: torch.Tensor, move_chance: torch.Tensor, mask_id: int, seed: int,
                positions: torch.Tensor) -> torch.Tensor:
    """z_t: each token replaced by the mask with probability move_chance [B] (keyed randomness)."""
    token_index = torch.arange(x0.shape[1], device=x0.device)
    u = keyed_uniform(seed, STREAM_MASK, positions[:, None], token_index[None, :])
    return torch.where(u < move_chance[:, None], torch.full_like(x0, mask_id), x0)


def suppress_logits(logits: torch.Tensor, mask_id: int, vocab_size: int) -> torch.Tensor:
    """The mask token and the padding rows past the real vocabulary can never be predicted.
    Works on a vocabulary-sharded DTensor too (tensor parallelism)."""
    return add_vocab_bias(logits, suppression_bias(logits.shape[-1], mask_id, vocab_size, logits.device))


def suppression_bias(rows: int, mask_id: int, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """What `suppress_logits` adds to logits over `rows` (padded) vocabulary ids: NEG_INF at the
    mask and the padding, 0 elsewhere (fp32)."""
    bias = torch.zeros(rows, dtype=torch.float32, device=device)
    bias[mask_id] = NEG_INF
    bias[vocab_size:] = NEG_INF
    return bias


@dataclass
class Noised:
    """One batch after the forward process."""

    x0: torch.Tensor          # clean tokens [B, L]
    zt: torch.Tensor          # masked tokens [B, L]
    sigma: torch.Tensor       # [B]
    weight: torch.Tensor      # dsigma / expm1(sigma), [B]
    token_mask: torch.Tensor  # float [B, L]: how much each token counts (0: not at all); sums to L per valid sample
    prompt: torch.Tensor | None = None  # bool [B, L]: True on prompt tokens (SFT), which stay clean everywhere


def add_noise(x0: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, *, cfg: DiffusionConfig,
              schedule: NoiseSchedule, mask_id: int, seed: int, global_batch_size: int, eps: float,
              prompt_length: torch.Tensor | None = None) -> Noised:
    """The forward process on a batch. With `prompt_length` [B] (SFT) the first prompt_length
    tokens of each sample are its prompt: never masked and weighted 0, the response weighted by
    `response_weights`; the noise level t is the sample's as always, so it masks response tokens only."""
    t = sample_t(seed, positions, global_batch_size, eps, cfg.antithetic_sampling)
    sigma, dsigma = schedule(t)
    zt = mask_tokens(x0, -torch.expm1(-sigma), mask_id, seed, positions)
    prompt = None
    if prompt_length is None:
        token_mask = valid[:, None].float().expand_as(x0)
    else:
        prompt, token_mask = response_weights(prompt_length, valid, x0.shape[1])
        zt = torch.where(prompt, x0, zt)
    return Noised(x0=x0, zt=zt, sigma=sigma, weight=loss_weight(sigma, dsigma), token_mask=token_mask, prompt=prompt)


def response_weights(prompt_length: torch.Tensor, valid: torch.Tensor,
                     length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt [B, L] bool, token weights [B, L]) of SFT samples: 0 on the prompt and L / (L -
    prompt_length) on each response token, EOS padding included.

    LLaDA's SFT (its GUIDELINES.md, the only published form of its SFT loss) divides each sample's
    masked-token terms by that sample's answer length (padding EOS included) and averages over the
    batch: mean_b [sum_{masked l} CE / t / answer_b]. The caller divides the summed terms by L
    per valid sample (`pretrain.train`: valid samples x L), so weighting a response token by
    L / answer_b gives exactly that average, on every layout; the corrector term is normalised
    the same way (the official ProSeCo code normalises both terms alike)."""
    positions = torch.arange(length, device=prompt_length.device)
    prompt = positions[None, :] < prompt_length[:, None]
    answer = (length - prompt_length).clamp(min=1).float()
    weights = (~prompt).float() * (length / answer)[:, None] * valid[:, None].float()
    return prompt, weights


def keep_prompt(y: torch.Tensor, noised: Noised) -> torch.Tensor:
    """The corrector input with the prompt's clean tokens (SFT; y itself without a prompt)."""
    return y if noised.prompt is None else torch.where(noised.prompt, noised.x0, y)


def corrector_input(scores: torch.Tensor, noised: Noised, cfg: DiffusionConfig, mask_id: int, seed: int,
                    positions: torch.Tensor) -> torch.Tensor:
    """y: the model's own reconstruction of z_t, without gradient.

    argmax (the paper) or a categorical sample of the mask-suppressed logits `scores`; at every
    position (corrector_input=all, the released runs: no carry-over, so even unmasked tokens may
    change) or only at masked positions with the clean tokens elsewhere (corrector_input=masked).
    An SFT prompt stays as it is in either case (`keep_prompt`).
    """
    token_index = torch.arange(scores.shape[1], device=noised.x0.device)
    return keep_prompt(draw_corrector_input(scores, noised.x0, noised.zt, positions[:, None], token_index[None, :],
                                            cfg, mask_id, seed), noised)


def draw_corrector_input(scores: torch.Tensor, x0: torch.Tensor, zt: torch.Tensor, sample_position: torch.Tensor,
                         token_index: torch.Tensor, cfg: DiffusionConfig, mask_id: int, seed: int) -> torch.Tensor:
    """`corrector_input` for scores [..., V] of any set of tokens: x0 and zt shaped like the tokens,
    each token's sample position and index in its sequence broadcasting to them (the keys of the
    sampling noise, so a chunk of tokens draws exactly what the whole batch draws there)."""
    with torch.no_grad():
        scores = scores.detach()
        if cfg.corrector_prior == "sample":
            # Gumbel-max keyed by the global vocabulary id: the same draw on any tensor-parallel split.
            noise = keyed_gumbel(seed, STREAM_CORRECTOR_SAMPLE, sample_position[..., None], token_index[..., None],
                                 vocab_index(scores))
            scores = with_local(scores, local_scores(scores) + noise)
        prediction = vocab_argmax(scores)
        if cfg.corrector_input == "masked":
            prediction = torch.where(zt == mask_id, prediction, x0)
        return prediction


def token_nll(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(scores)[target] per token, [B, L] in fp32 (scores: mask-suppressed logits;
    loss-parallel when they are sharded over the vocabulary)."""
    return vocab_cross_entropy(scores, target)


@dataclass
class Losses:
    """Per-token loss terms, each [B, L], already multiplied by token_mask (not yet normalised)."""

    total: torch.Tensor
    mdlm: torch.Tensor       # MDLM NELBO terms (masked positions only)
    corrector: torch.Tensor  # corrector terms (zero when the corrector is off)
    corrector_input_errors: torch.Tensor  # 1 where y != x0 (no grad)
    corrector_output_errors: torch.Tensor  # 1 where argmax of the corrector != x0 (no grad)


def mdlm_losses(scores_zt: torch.Tensor, noised: Noised, mask_id: int) -> torch.Tensor:
    """Per-token MDLM loss: weight * -log p(x0 | z_t) at masked positions, 0 elsewhere."""
    return mdlm_from_nll(token_nll(scores_zt, noised.x0), noised, mask_id)


def mdlm_from_nll(nll: torch.Tensor, noised: Noised, mask_id: int) -> torch.Tensor:
    """`mdlm_losses` from -log p(x0 | z_t) per token [B, L]."""
    masked = (noised.zt == mask_id).float()
    return noised.weight[:, None] * nll * masked * noised.token_mask


def proseco_losses(scores_zt: torch.Tensor, scores_y: torch.Tensor | None, y: torch.Tensor | None, noised: Noised,
                   cfg: DiffusionConfig, mask_id: int) -> Losses:
    """The joint objective of the official code, switch by switch (proseco-method.md section 2.2).

    `scores_*` are the logits of the two passes with the mask suppressed (`suppress_logits`).
    With scores_y None (before corrector_training_start_step, or corrector_training off) this is
    plain MDLM, unscaled by mdlm_loss_weight, as the official fall-through branch.
    """
    nll_zt = token_nll(scores_zt, noised.x0)
    if scores_y is None:
        return losses_from_terms(nll_zt, None, None, None, noised, cfg, mask_id)
    with torch.no_grad():
        argmax_y = vocab_argmax(scores_y.detach())
    return losses_from_terms(nll_zt, token_nll(scores_y, noised.x0), argmax_y, y, noised, cfg, mask_id)


def losses_from_terms(nll_zt: torch.Tensor, nll_y: torch.Tensor | None, argmax_y: torch.Tensor | None,
                      y: torch.Tensor | None, noised: Noised, cfg: DiffusionConfig, mask_id: int) -> Losses:
    """`proseco_losses` from what the logits give per token [B, L]: -log p(x0) under each pass and
    the corrector's argmax. The chunked loss (pretrain/step.py), which never holds all logits at
    once, computes these chunk by chunk and meets the whole-logits path here."""
    mdlm = mdlm_from_nll(nll_zt, noised, mask_id)
    if nll_y is None:
        zeros = torch.zeros_like(mdlm)
        return Losses(total=mdlm, mdlm=mdlm, corrector=zeros, corrector_input_errors=zeros,
                      corrector_output_errors=zeros)
    weight = noised.weight[:, None] if cfg.weighted_corrector_loss else torch.ones_like(noised.weight)[:, None]
    wrong_input = (y != noised.x0)
    if cfg.corrector_errors_upweighted:
        # Log-loss where the input is wrong, minus the probability where it is already right:
        # correct positions get the cross-entropy gradient scaled by p (App. C.3 of the paper).
        per_token = torch.where(wrong_input, nll_y, -torch.exp(-nll_y))
    else:
        per_token = nll_y
    corrector = weight * per_token * noised.token_mask
    total = cfg.mdlm_loss_weight * mdlm + cfg.corrector_loss_weight * corrector
    output_wrong = argmax_y != noised.x0
    return Losses(total=total, mdlm=mdlm, corrector=corrector,
                  corrector_input_errors=wrong_input.float() * noised.token_mask,
                  corrector_output_errors=output_wrong.float() * noised.token_mask)
