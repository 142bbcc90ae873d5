"""ProSeCo sampling: MDLM ancestral sampling with self-correction loops (proseco-method.md section 3).

Two samplers share the corrector:

- `ancestral`: T unmasking steps from t=1 to t=1e-5 (MDLM's ddpm_cache update). Every omega steps
  a corrector loop runs: y = the denoiser's argmax (or a sample), then S rounds of y <- update(
  corrector(y)) on the fully unmasked sequence; the result is written back only to positions
  that were unmasked before the step, and the step's unmasking is drawn from the corrector's
  distribution (the denoiser's own draw is discarded). Which positions a step unmasks is MDLM's
  posterior (`sampling.unmasking=posterior`) or the schedule's expected count, most confident
  first (`confidence`).
- `blockwise` (sampling.block_length set): LLaDA-style semi-autoregressive blocks with
  low-confidence unmasking; the corrector stops early at a fixed point and rewrites committed
  tokens up to the current block; with `early_eos_stop` a sample whose block ends in EOS stops.

Caching and NFE accounting are per sample: a sample whose input did not change since its last
forward reuses that forward (no NFE), so the counts are what the official code reports with batch
size 1, whatever the batch size here; a corrector that reached a fixed point costs no further
forward. A prompt (fixed prefix) is never rewritten.

Classifier-free guidance (a model trained with data.labels; sampling.label, sampling.guidance =
gamma): the denoiser's log-probabilities are gamma * log p(x | label) + (1 - gamma) * log p(x |
null), renormalised (`guided_scores`, the official `_cfg_denoise`); gamma = 1 is the conditional
model alone. The corrector, and the prior it starts from, use the conditional branch only, and the
unmasking that follows a loop draws from the corrector's conditional distribution (gamma is
effectively 1 there), as the official sampler; a later step that reuses the cache mixes the
corrector's distribution with the last unconditional one, as the official cache does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.config import RunConfig, SamplingConfig
from pretrain.diffusion import NoiseSchedule, suppress_logits
from pretrain.errors import ConfigError
from tokenizer.tokenizers import Tokenizer

FINAL_EPS = 1e-5  # the official sampler ends at t = 1e-5, not at the training eps


@dataclass
class SampleResult:
    tokens: torch.Tensor         # [N, L]
    nfe_denoiser: torch.Tensor   # [N] forwards of the denoiser on each sample
    nfe_corrector: torch.Tensor  # [N] forwards of the corrector on each sample

    @property
    def nfe_total(self) -> torch.Tensor:
        return self.nfe_denoiser + self.nfe_corrector


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose cumulative probability stays within top_p (always the top
    one), renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) <= top_p
    keep[..., 0] = True
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return filtered / filtered.sum(-1, keepdim=True)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of `probs` (unnormalised is fine) by inverting its CDF, in the probabilities'
    dtype (fp64 avoids the low-precision sampling bias the official code fixes with fp64 Gumbel).

    Same distribution as the official Gumbel-max draw, with one uniform per position instead of
    one per vocabulary entry. A zero-probability token is never drawn: u lies in (0, total].
    """
    cdf = probs.cumsum(-1)
    u = (1.0 - torch.rand(probs.shape[:-1], generator=generator, dtype=probs.dtype, device=probs.device))
    u = u * cdf[..., -1]
    return torch.searchsorted(cdf, u[..., None]).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _at(per_row: torch.Tensor | None, where: torch.Tensor) -> torch.Tensor | None:
    """A per-row value [B] at the positions `where` [B, L] (in where's nonzero order)."""
    return None if per_row is None else per_row[:, None].expand(where.shape)[where]


def write_back(x: torch.Tensor, y: torch.Tensor, fixed: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Corrections land only on tokens unmasked before this step (never on the prompt)."""
    return torch.where((x != mask_id) & ~fixed, y, x)


def guided_scores(cond: torch.Tensor, uncond: torch.Tensor, gamma: float) -> torch.Tensor:
    """Classifier-free guidance on the denoiser's (mask-suppressed) scores: gamma * log p_cond +
    (1 - gamma) * log p_uncond, the official code's mix of log-probabilities (softmax renormalises
    it wherever it is sampled). The suppressed entries stay finite (NEG_INF, not -inf), so no
    inf - inf arises."""
    cond, uncond = torch.log_softmax(cond, -1), torch.log_softmax(uncond, -1)
    return gamma * cond + (1.0 - gamma) * uncond


class Sampler:
    """Draws samples from a denoiser (plain or EMA weights: the caller chooses) with ProSeCo loops."""

    def __init__(self, model: nn.Module, cfg: SamplingConfig, *, mask_id: int, vocab_size: int, seq_len: int,
                 schedule: NoiseSchedule, time_conditioning: bool = False, device: torch.device | None = None,
                 autocast: torch.autocast | None = None, eos_id: int | None = None, num_classes: int = 0):
        self.model, self.cfg = model, cfg
        self.mask_id, self.vocab_size, self.seq_len, self.eos_id = mask_id, vocab_size, seq_len, eos_id
        self.schedule, self.time_conditioning = schedule, time_conditioning
        self.device = device or next(model.parameters()).device
        self.dtype = torch.float64 if cfg.float64 else torch.float32  # of the sampled probabilities
        self.autocast = autocast
        # ConfigError: `proseco sweep` and scripts reach the sampler without validate(); the CLI prints it.
        if cfg.label is not None and not 0 <= cfg.label < num_classes:
            raise ConfigError(f"sampling.label={cfg.label} is not a class of this model (model.num_classes="
                             f"{num_classes}): choose one of 0..{num_classes - 1}, or null" if num_classes else
                             f"sampling.label={cfg.label} needs a model trained on labels (data.labels)")
        if cfg.guidance != 1.0 and cfg.label is None:
            raise ConfigError(f"sampling.guidance={cfg.guidance} needs sampling.label (the class to guide towards)")
        self.label = cfg.label  # the conditional branch's class (None: the model's own default, the null class)
        self.null_class = num_classes  # the unconditional branch
        self.guided = cfg.guidance != 1.0

    @classmethod
    def for_run(cls, model: nn.Module, cfg: RunConfig, tokenizer: Tokenizer, sampling: SamplingConfig,
                device: torch.device) -> Sampler:
        """The sampler of a trained run: its tokenizer's ids, sequence length, noise schedule and
        time conditioning, with the sampler settings `sampling` (the run's own or changed ones)."""
        return cls(model, sampling, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                   seq_len=cfg.model.seq_len, schedule=NoiseSchedule(cfg.diffusion),
                   time_conditioning=cfg.model.time_conditioning, device=device, eos_id=tokenizer.eos_id,
                   num_classes=getattr(cfg.model, "num_classes", None) or 0)

    # -- forwards (the only place NFEs are spent) ------------------------------------------------

    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor, sigma: float, labels: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits of `tokens` with the mask and padding suppressed (sigma is ignored without
        time conditioning). Softmax is taken only where a position is actually sampled; SUBS's
        carry-over is applied where it matters (unmasked tokens are kept as they are)."""
        inputs = (tokens, torch.full((tokens.shape[0],), sigma, device=tokens.device))
        inputs += () if labels is None else (labels,)
        if self.autocast is not None:
            with self.autocast:
                logits = self.model(*inputs).float()
        else:
            logits = self.model(*inputs).float()
        return suppress_logits(logits, self.mask_id, self.vocab_size)

    def _classes(self, count: int, label: int | None) -> torch.Tensor | None:
        return None if label is None else torch.full((count,), label, dtype=torch.long, device=self.device)

    def _scores(self, x: torch.Tensor, rows: torch.Tensor, sigma: float) -> torch.Tensor:
        """The conditional model's scores of the selected rows: what the corrector (and, without
        guidance, the denoiser) uses."""
        tokens = x[rows]
        return self._forward(tokens, sigma, self._classes(tokens.shape[0], self.label))

    def _branches(self, x: torch.Tensor, rows: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The denoiser's conditional and (with guidance) unconditional scores of the selected rows.

        Both branches run as one forward of twice the rows ([label; null]) and count as one NFE,
        as in the official code, which adds one denoising NFE per step before `_cfg_denoise`
        runs its two forwards: they are one network evaluation per step in latency (here literally
        one batched call), though twice its FLOPs."""
        if not self.guided:
            return self._scores(x, rows, sigma), None
        tokens = x[rows]
        count = tokens.shape[0]
        labels = torch.cat([self._classes(count, self.label), self._classes(count, self.null_class)])
        both = self._forward(torch.cat([tokens, tokens]), sigma, labels)
        return both[:count], both[count:]

    def _denoise(self, x: torch.Tensor, rows: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores to unmask from, conditional scores) of the selected rows: the guided mix with
        guidance, the conditional model's scores (the same tensor twice) without."""
        cond, uncond = self._branches(x, rows, sigma)
        return (cond if uncond is None else guided_scores(cond, uncond, self.cfg.guidance)), cond

    @staticmethod
    def _put(buffer: torch.Tensor | None, rows: torch.Tensor, computed: torch.Tensor, batch: int) -> torch.Tensor:
        """`buffer` (all rows of a batch) with the selected rows replaced. The buffer is allocated
        at the first forward, whose output says how many vocabulary rows the model has (the real
        vocabulary, or more when padded for tensor parallelism)."""
        if buffer is None:
            buffer = computed.new_empty((batch, *computed.shape[1:]))
        buffer[rows] = computed
        return buffer

    def _refresh(self, scores: torch.Tensor | None, x: torch.Tensor, rows: torch.Tensor,
                 sigma: float) -> torch.Tensor:
        """Conditional `scores` of all rows of x with the selected rows recomputed."""
        return self._put(scores, rows, self._scores(x, rows, sigma), x.shape[0])

    # -- shared pieces ---------------------------------------------------------------------------

    def _start(self, num_samples: int, prompt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.full((num_samples, self.seq_len), self.mask_id, dtype=torch.long, device=self.device)
        fixed = torch.zeros_like(x, dtype=torch.bool)
        if prompt is not None:
            prompt = prompt.to(self.device)
            if prompt.dim() == 1:
                prompt = prompt.expand(num_samples, -1)
            if prompt.shape[1] >= self.seq_len:
                raise ValueError(f"a prompt of {prompt.shape[1]} tokens leaves nothing to generate in {self.seq_len}")
            x[:, : prompt.shape[1]] = prompt
            fixed[:, : prompt.shape[1]] = True
        return x, fixed

    def _probs(self, scores: torch.Tensor, passes: torch.Tensor | None = None) -> torch.Tensor:
        """Sampling distribution of some rows of scores: softmax in the sampling dtype (fp64 by
        default), nucleus-filtered (`passes` times per row, for the official cache semantics;
        once by default). Only the positions actually sampled are converted."""
        probs = torch.softmax(scores.to(self.dtype), -1)
        if self.cfg.nucleus_p >= 1.0:
            return probs
        if passes is None:
            return nucleus(probs, self.cfg.nucleus_p)
        for k in range(int(passes.max()) if passes.numel() else 0):
            probs = torch.where((passes > k)[:, None], nucleus(probs, self.cfg.nucleus_p), probs)
        return probs

    def _draw(self, scores: torch.Tensor, where: torch.Tensor, fallback: torch.Tensor,
              generator: torch.Generator, passes: torch.Tensor | None = None) -> torch.Tensor:
        """A token drawn from softmax(scores) at the positions `where`, `fallback` elsewhere;
        `passes` [B]: nucleus filters per row (None: one)."""
        out = fallback.clone()
        if where.any():
            out[where] = sample_categorical(self._probs(scores[where], _at(passes, where)), generator)
        return out

    def _corrector_update(self, scores: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mode = self.cfg.corrector_sampling
        if mode == "argmax":  # the nucleus always keeps the top token: no need to filter
            return scores.argmax(-1)
        if mode == "sample":
            return self._draw(scores, torch.ones_like(y, dtype=torch.bool), y, generator)
        # select_top_k: change only the k most confident positions where the argmax disagrees with y.
        probs = self._probs(scores)
        confidence, proposal = probs.max(-1)
        confidence = torch.where(proposal != y, confidence, torch.full_like(confidence, -1.0))
        top = confidence.topk(min(self.cfg.corrector_top_k, y.shape[1]), dim=-1).indices
        chosen = torch.zeros_like(y, dtype=torch.bool).scatter(1, top, True) & (proposal != y)
        return torch.where(chosen, proposal, y)

    def _corrector_loop(self, y: torch.Tensor, fixed: torch.Tensor, sigma: float, nfe: torch.Tensor,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """S rounds of y <- update(corrector(y)); returns y and the last corrector log-probs.

        A round whose input equals the previous round's reuses that forward (the fixed point costs
        nothing more and changes nothing with argmax updates).
        """
        batch = y.shape[0]
        scores = None  # allocated by the first round, which forwards every row
        fresh = torch.zeros(batch, dtype=torch.bool, device=y.device)  # scores[row] belong to y[row]
        for _ in range(self.cfg.corrector_steps):
            need = ~fresh
            if need.any():
                scores = self._refresh(scores, y, need, sigma)
                nfe[need] += 1
            proposal = torch.where(fixed, y, self._corrector_update(scores, y, generator))  # the prompt stays
            fresh = (proposal == y).all(-1) if self.cfg.use_cache else torch.zeros_like(fresh)
            y = proposal
        return y, scores

    # -- ancestral sampling ----------------------------------------------------------------------

    def _keep_masked(self, t: float, s: float) -> float:
        """mc_s / mc_t: the chance that a position masked at t is still masked at s."""
        mc_t = float(self.schedule.move_chance(torch.tensor(t, dtype=torch.float64)))
        mc_s = float(self.schedule.move_chance(torch.tensor(s, dtype=torch.float64)))
        return mc_s / mc_t

    def _unmask(self, scores: torch.Tensor, x: torch.Tensor, t: float, s: float, generator: torch.Generator,
                passes: torch.Tensor | None = None) -> torch.Tensor:
        """One unmasking step from t to s (sampling.unmasking); unmasked tokens are copied."""
        if self.cfg.unmasking == "confidence":
            return self._confidence_unmask(scores, x, self._keep_masked(t, s), generator, passes)
        return self._posterior_sample(scores, x, self._keep_masked(t, s), generator, passes)

    def _posterior_sample(self, scores: torch.Tensor, x: torch.Tensor, keep: float, generator: torch.Generator,
                          passes: torch.Tensor | None = None) -> torch.Tensor:
        """MDLM's reverse step: a masked position stays masked with probability keep = mc_s / mc_t,
        else takes a token drawn from its distribution. (The same distribution as one draw from
        q = [p (1 - mc_s/mc_t), mc_s/mc_t].)"""
        masked = x == self.mask_id
        stay = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device) < keep
        return self._draw(scores, masked & ~stay, x, generator, passes)

    def _confidence_unmask(self, scores: torch.Tensor, x: torch.Tensor, keep: float, generator: torch.Generator,
                           passes: torch.Tensor | None = None) -> torch.Tensor:
        """Unmask the number of positions the schedule expects (all but round(masked * keep) per
        sample), choosing those whose drawn token has the highest probability: a token is drawn
        at every masked position, the most confident are kept (LLaDA's low-confidence remasking,
        with the MDLM schedule's step sizes)."""
        masked = x == self.mask_id
        if not masked.any():
            return x
        probs = self._probs(scores[masked], _at(passes, masked))
        drawn = sample_categorical(probs, generator)
        proposal = x.clone()
        proposal[masked] = drawn
        confidence = torch.full(x.shape, -1.0, dtype=probs.dtype, device=x.device)
        confidence[masked] = probs.gather(-1, drawn[:, None])[:, 0]
        count = masked.sum(-1)
        quota = count - torch.floor(count.to(torch.float64) * keep + 0.5).long()
        rank = torch.empty_like(x).scatter_(1, confidence.argsort(dim=-1, descending=True, stable=True),
                                            torch.arange(x.shape[1], device=x.device).expand_as(x))
        return torch.where(masked & (rank < quota[:, None]), proposal, x)

    def _ancestral(self, x: torch.Tensor, fixed: torch.Tensor, generator: torch.Generator,
                   progress=None) -> SampleResult:
        cfg, steps, batch = self.cfg, self.cfg.steps, x.shape[0]
        nfe_den = torch.zeros(batch, dtype=torch.long, device=x.device)
        nfe_cor = torch.zeros_like(nfe_den)
        # Allocated by the first step, which forwards every row: the scores unmasking draws from,
        # the conditional ones the corrector's prior comes from (the same without guidance), and
        # with guidance the unconditional ones, kept for a cached step after a corrector loop.
        scores = cond = uncond = None
        fresh = torch.zeros(batch, dtype=torch.bool, device=x.device)  # scores[row] belong to x[row]
        # The denoiser's distribution carries unmasked tokens over (SUBS); a cached corrector
        # distribution (after a loop, as the official cache) does not.
        carry = torch.ones(batch, dtype=torch.bool, device=x.device)
        # Reusing a forward is exact only when the network does not see t.
        cache = cfg.use_cache and not self.time_conditioning
        # Nucleus filters already applied to each row's cached distribution: the official sampler
        # caches the filtered probabilities and filters them again at every reuse.
        filtered = torch.zeros(batch, dtype=torch.long, device=x.device)
        times = torch.linspace(1.0, FINAL_EPS, steps + 1, dtype=torch.float64).tolist()
        for i in range(steps):
            t, s = times[i], times[i + 1]
            sigma = float(self.schedule(torch.tensor(t, dtype=torch.float64))[0])
            need = ~fresh
            if need.any():
                computed_cond, computed_uncond = self._branches(x, need, sigma)
                cond = self._put(cond, need, computed_cond, batch)
                if computed_uncond is None:
                    scores = cond
                else:
                    uncond = self._put(uncond, need, computed_uncond, batch)
                    scores = self._put(scores, need, guided_scores(computed_cond, computed_uncond, cfg.guidance),
                                       batch)
                nfe_den[need] += 1  # both guidance branches: one NFE (_branches)
                carry |= need
                filtered[need] = 0
            if cfg.nucleus_cache == "official":
                filtered = filtered + 1
                x_next = self._unmask(scores, x, t, s, generator, filtered)
            else:
                x_next = self._unmask(scores, x, t, s, generator)
            if cfg.corrector_steps > 0 and (i + 1) % cfg.corrector_every == 0 and i + 1 >= cfg.corrector_start_iter:
                kept = (x != self.mask_id) & carry[:, None]
                # The corrector starts from the conditional branch (the official cache key log_x_theta_cond).
                if cfg.corrector_prior == "argmax":
                    prior = torch.where(kept, x, cond.argmax(-1))
                else:
                    prior = self._draw(cond, ~kept, x, generator)
                y, corrector_scores = self._corrector_loop(torch.where(fixed, x, prior), fixed, sigma, nfe_cor,
                                                           generator)
                x = write_back(x, y, fixed, self.mask_id)
                # The unmasking of this step is drawn from the corrector's distribution instead
                # (filtered once; the official sampler caches it unfiltered).
                x_next = self._unmask(corrector_scores, x, t, s, generator)
                # The corrector's distribution replaces the conditional branch in the cache; with
                # guidance a cached next step mixes it with the last unconditional one (as official).
                cond = corrector_scores
                scores = corrector_scores if uncond is None else guided_scores(corrector_scores, uncond, cfg.guidance)
                carry, filtered = torch.zeros_like(carry), torch.zeros_like(filtered)
            fresh = (x_next == x).all(-1) if cache else torch.zeros_like(fresh)
            x = x_next
            if progress is not None:
                progress(i + 1, steps, x)
        if cfg.denoise_final:
            left = (x == self.mask_id).any(-1)
            if left.any():
                final = self._denoise(x, left, 0.0)[0].argmax(-1)
                x[left] = torch.where(x[left] == self.mask_id, final, x[left])
                nfe_den[left] += 1
        return SampleResult(x, nfe_den, nfe_cor)

    # -- semi-autoregressive blocks --------------------------------------------------------------

    def _blockwise(self, x: torch.Tensor, fixed: torch.Tensor, generator: torch.Generator,
                   progress=None) -> SampleResult:
        cfg, batch = self.cfg, x.shape[0]
        start = int(fixed[0].sum())
        block = cfg.block_length
        generated = self.seq_len - start
        if generated % block:
            raise ValueError(f"sampling.block_length={block} must divide the {generated} generated positions")
        num_blocks = generated // block
        if cfg.steps % num_blocks:
            raise ValueError(f"sampling.steps={cfg.steps} must be a multiple of the {num_blocks} blocks")
        if cfg.early_eos_stop and self.eos_id is None:
            raise ValueError("sampling.early_eos_stop needs the tokenizer's EOS id")
        steps_per_block = cfg.steps // num_blocks
        nfe_den = torch.zeros(batch, dtype=torch.long, device=x.device)
        nfe_cor = torch.zeros_like(nfe_den)
        active = torch.ones(batch, dtype=torch.bool, device=x.device)  # samples still generating
        step_index = 0
        for b in range(num_blocks):
            hi = start + (b + 1) * block  # end of the current block
            # Unmask an even share of the block per step, the remainder in the first steps (as LLaDA).
            base, extra = divmod(block, steps_per_block)
            quota = [base + (1 if k < extra else 0) for k in range(steps_per_block)]
            for k in range(steps_per_block):
                rows = active.nonzero()[:, 0]
                corrects = (k + 1) % cfg.corrector_every == 0 and step_index + 1 >= cfg.corrector_start_iter
                x[rows] = self._block_step(x[rows], fixed[rows], hi, quota[k], corrects, rows, nfe_den, nfe_cor,
                                           generator)
                step_index += 1
                if progress is not None:
                    progress(step_index, cfg.steps, x)
            if cfg.early_eos_stop:
                # A sample whose finished block ends in EOS is done: the rest is EOS, no more forwards.
                done = active & (x[:, hi - 1] == self.eos_id)
                x[done] = torch.where(x[done] == self.mask_id, self.eos_id, x[done])
                active &= ~done
                if not active.any():
                    break
        return SampleResult(x, nfe_den, nfe_cor)

    def _block_step(self, x: torch.Tensor, fixed: torch.Tensor, hi: int, quota: int, corrects: bool,
                    rows: torch.Tensor, nfe_den: torch.Tensor, nfe_cor: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
        """One step of the current block (ending at `hi`) for the samples `rows` (x holds only them):
        a forward, an optional corrector loop, then the `quota` most confident masked positions
        of the block take their proposal. NFEs are added to the rows' counters."""
        all_rows = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        positions = torch.arange(self.seq_len, device=x.device)
        scores, cond = self._denoise(x, all_rows, 0.0)
        nfe_den[rows] += 1  # both guidance branches: one NFE (_branches)
        selectable = (x == self.mask_id) & (positions < hi)
        if self.cfg.corrector_steps > 0 and corrects:
            nfe = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            x, scores = self._block_corrector(x, cond, selectable, fixed, hi, nfe)  # the conditional branch
            nfe_cor[rows] += nfe
        if self.cfg.temperature > 0:
            proposal = sample_categorical(torch.softmax(scores.to(self.dtype) / self.cfg.temperature, -1), generator)
        else:
            proposal = scores.argmax(-1)
        confidence = (scores.gather(-1, proposal[..., None])[..., 0] - scores.logsumexp(-1)).exp()
        confidence = torch.where(selectable, confidence, torch.full_like(confidence, -1.0))
        chosen_index = confidence.topk(quota, dim=-1).indices
        chosen = torch.zeros_like(selectable).scatter(1, chosen_index, True) & selectable
        return torch.where(chosen, proposal, x)

    def _block_corrector(self, x: torch.Tensor, scores: torch.Tensor, selectable: torch.Tensor, fixed: torch.Tensor,
                         hi: int, nfe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LLaDA-variant loop: argmax fills every mask (future blocks too), committed tokens stay; up to
        S argmax rounds over the generated part up to the current block, stopping per sample at a
        fixed point (that pass is counted). Committed tokens take the corrector's final argmax and
        the corrector's logits drive this step's unmasking of the current block."""
        editable = torch.zeros_like(selectable)
        editable[:, :hi] = True
        editable &= ~fixed
        y = torch.where(x == self.mask_id, scores.argmax(-1), x)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        corrected = scores.clone()
        for _ in range(self.cfg.corrector_steps):
            rows = active.nonzero()[:, 0]
            logits = self._scores(y, active, 0.0)
            nfe[active] += 1
            corrected[rows] = torch.where(editable[rows, :, None], logits, corrected[rows])
            proposal = torch.where(editable[rows], logits.argmax(-1), y[rows])
            converged = (proposal == y[rows]).all(-1)
            y[rows] = proposal
            active[rows[converged]] = False
            if not active.any():
                break
        commit = editable & ~selectable  # tokens already committed before this step
        return torch.where(commit, y, x), corrected

    # -- entry point -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, num_samples: int, prompt: torch.Tensor | None = None, seed: int | None = None,
               progress=None) -> SampleResult:
        """Generate `num_samples` sequences in batches of cfg.batch_size.

        `progress(step, total, x)` is called after every unmasking step with the current tokens.
        """
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed if seed is None else seed)
        results = []
        try:
            for first in range(0, num_samples, self.cfg.batch_size):
                count = min(self.cfg.batch_size, num_samples - first)
                x, fixed = self._start(count, prompt)
                run = self._blockwise if self.cfg.block_length else self._ancestral
                results.append(run(x, fixed, generator, progress))
        finally:
            self.model.train(was_training)
        return SampleResult(*(torch.cat([getattr(r, name) for r in results])
                              for name in ("tokens", "nfe_denoiser", "nfe_corrector")))
