"""The ProSeCo objective over the micro-batches of one step, through a runner.

One code path for every layout: `forward_backward` talks to a runner with the pipeline runner's
interface (parallel/runner.py for the whole model in this process, parallel/pipeline.py for
pipeline stages), so the training loop and validation never branch on the layout. Two ways to
build the corrector input y from the model's own prediction, with the same loss and gradients
when dropout is off:

- reuse (the official code's cost, 2 forward+backward): forward z_t with grad, y = argmax of its
  detached logits, forward y with grad. Needs the whole model in one process (runner.forward).
- two_pass (what pipeline parallelism runs): pass 1 forwards z_t under no_grad (it stores no
  activations), giving y; pass 2 forwards z_t and y together as one batch of 2B, with grad.
  Pass 1 costs one extra forward: 7 units of work against reuse's 6 and MDLM's 3.

Every rank computes the masks itself (keyed randomness), so only y and activations travel.

The logits are never held whole (diffusion.loss_chunk_tokens > 0, the default): the model's last
stage returns its final features, and each pass's loss terms (-log p(x0) per token, pass 1's y,
the corrector's argmax) are computed `loss_chunk_tokens` tokens at a time, the output projection
fused in (and vocabulary-parallel under tensor parallelism) by a function that keeps only the
features and the log-normaliser for backward, which recomputes the chunk's logits and turns them
in place into their gradient: one chunk's logits are live at a time. Losses are per
token and the sampling noise is keyed by global position, so chunks give the whole-logits
results (the same argmaxes and draws, losses and gradients to fp32 rounding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from parallel.rng import STREAM_LABEL_DROPOUT, keyed_uniform
from parallel.tensor import gather_head_input, project_vocab, projected_nll, vocab_argmax
from pretrain.config import DiffusionConfig
from pretrain.diffusion import (
    Losses,
    Noised,
    NoiseSchedule,
    add_noise,
    corrector_input,
    draw_corrector_input,
    keep_prompt,
    losses_from_terms,
    suppress_logits,
    suppression_bias,
    token_nll,
)


@dataclass
class Objective:
    """Everything the step needs besides the model and the batch."""

    cfg: DiffusionConfig
    mask_id: int
    vocab_size: int  # real vocabulary (rows past it, padding for tensor parallelism, are never predicted)
    seed: int
    global_batch_size: int
    schedule: NoiseSchedule
    num_classes: int = 0  # classes of the conditioning labels (0: none); the null class is num_classes

    @classmethod
    def build(cls, cfg: DiffusionConfig, *, mask_id: int, vocab_size: int, seed: int, global_batch_size: int,
              num_classes: int = 0):
        return cls(cfg, mask_id, vocab_size, seed, global_batch_size, NoiseSchedule(cfg), num_classes)

    def labels(self, batch: dict, training: bool) -> torch.Tensor | None:
        """The class labels the model sees for a batch (None: the batch has none). In training each
        becomes the null class with probability cond_dropout, drawn from the sample's global stream
        position (which also fixes the step), so every layout drops the same labels, both passes
        see the same ones, and the dropout needs no generator state to resume."""
        labels = batch.get("label")
        if labels is None or not self.num_classes:
            return None
        if not training or self.cfg.cond_dropout == 0:
            return labels
        dropped = keyed_uniform(self.seed, STREAM_LABEL_DROPOUT, batch["position"]) < self.cfg.cond_dropout
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    def corrector_active(self, step: int) -> bool:
        return self.cfg.corrector_training and step >= self.cfg.corrector_training_start_step

    def noise(self, batch: dict, training: bool) -> Noised:
        eps = self.cfg.sampling_eps_training if training else self.cfg.sampling_eps_validation
        return add_noise(batch["tokens"], batch["position"], batch["valid"], cfg=self.cfg, schedule=self.schedule,
                         mask_id=self.mask_id, seed=self.seed, global_batch_size=self.global_batch_size, eps=eps,
                         prompt_length=batch.get("prompt_length"))  # SFT folders: response-only loss

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits with the mask (and tensor-parallel padding) suppressed, computed once per
        pass and shared by the argmax and the loss."""
        return suppress_logits(logits.float(), self.mask_id, self.vocab_size)

    def corrector_input(self, scores_zt: torch.Tensor, noised: Noised, positions: torch.Tensor) -> torch.Tensor:
        return corrector_input(scores_zt, noised, self.cfg, self.mask_id, self.seed, positions)

    def terms(self, output: torch.Tensor, head: OutputHead | None, noised: Noised, positions: torch.Tensor, *,
              nll: bool = True, then: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What one pass over a micro-batch gives the loss, each [B, L]: -log p(x0) per token (with
        `nll`) and, without gradient, `then`: "draw" the corrector input y, or the "argmax".

        `output` is the model's logits, or with `head` (the output projection) its final features,
        which are then projected `cfg.loss_chunk_tokens` tokens at a time (`_chunked_terms`).
        """
        if head is None:
            scores = self.scores(output)
            extra = (self.corrector_input(scores, noised, positions) if then == "draw"
                     else vocab_argmax(scores.detach()) if then == "argmax" else None)
            return (token_nll(scores, noised.x0) if nll else None), extra
        nll_out, extra = self._chunked_terms(output, head(), noised, positions, nll, then)
        return nll_out, (keep_prompt(extra, noised) if then == "draw" else extra)  # an SFT prompt stays in y

    def _chunked_terms(self, features: torch.Tensor, head: nn.Linear, noised: Noised, positions: torch.Tensor,
                       nll: bool, then: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        rows, length = noised.x0.shape
        # Under sequence parallelism a rank holds a slice of each sequence; the projection needs them whole.
        whole = gather_head_input(features, head, sequence_sharded=features.shape[1] != length)
        bias = suppression_bias(head.out_features, self.mask_id, self.vocab_size, features.device)
        x0, zt = noised.x0.reshape(-1), noised.zt.reshape(-1)
        sample_position = positions[:, None].expand(rows, length).reshape(-1)
        token_index = torch.arange(length, device=x0.device)[None].expand(rows, length).reshape(-1)
        size = self.cfg.loss_chunk_tokens

        def chunk_terms(chunk: torch.Tensor, start: int, fused: bool = False) -> tuple[torch.Tensor, ...]:
            part = slice(start, start + chunk.shape[0])
            if fused:  # the projection and the cross entropy in one function that keeps no logits
                nll_chunk, scores = projected_nll(chunk, head, bias, x0[part])
                out = (nll_chunk,)
            else:
                scores = project_vocab(chunk, head, bias)
                out = (token_nll(scores, x0[part]),) if nll else ()
            # After the loss: checkpoint's recomputation stops once the cross entropy has saved its
            # tensors again, so backward never redoes the argmax (or the draw) below.
            if then == "draw":
                out += (draw_corrector_input(scores, x0[part], zt[part], sample_position[part], token_index[part],
                                             self.cfg, self.mask_id, self.seed),)
            elif then == "argmax":
                out += (vocab_argmax(scores.detach()),)
            return out

        with_grad = nll and torch.is_grad_enabled() and whole.requires_grad
        # Under DeepSpeed ZeRO-3 (its parameters carry ds_id) the head goes through the module or
        # plain autograd, each chunk under activation checkpointing instead: its weight exists only
        # inside the module's forward unless small enough to persist, and even a persistent one's
        # gradient, from the fused function, made two runs that must agree bit for bit differ in
        # the 9th digit of the gradient norm (tests/test_deepspeed.py, the nonfinite test).
        fused = with_grad and not hasattr(head.weight, "ds_id")
        recompute = with_grad and not fused
        results = []
        # split, not slicing: its backward assembles the chunks' gradients in one concatenation.
        for index, chunk in enumerate(whole.reshape(rows * length, -1).split(size)):
            if fused:
                results.append(chunk_terms(chunk, index * size, fused=True))
            elif recompute:
                results.append(checkpoint(chunk_terms, chunk, index * size, use_reentrant=False,
                                          preserve_rng_state=False))  # no randomness but keyed noise
            else:
                results.append(chunk_terms(chunk, index * size))
        columns = [torch.cat(column).view(rows, length) for column in zip(*results)]
        nll_out = columns.pop(0) if nll else None
        return nll_out, (columns[0] if then is not None else None)

    def joint(self, terms_zt, terms_y, y: torch.Tensor | None, noised: Noised) -> Losses:
        """The loss terms of both passes, from `terms` (terms_y None: plain MDLM)."""
        nll_y, argmax_y = terms_y if terms_y is not None else (None, None)
        return losses_from_terms(terms_zt[0], nll_y, argmax_y, y, noised, self.cfg, self.mask_id)


class OutputHead:
    """The output projection of the model part that holds it, for the chunked loss."""

    def __init__(self, owner: nn.Module):
        self.owner, self.linear = owner, owner.output_head
        self.gathered = False

    def __call__(self) -> nn.Linear:
        """The projection with whole parameters. FSDP2 (fully_shard, an `unshard` method) frees
        its root unit's parameters after forward; unshard() gathers them until its post-backward
        reshards them (`release` after a step without backward)."""
        if hasattr(self.owner, "unshard"):
            self.owner.unshard()
            self.gathered = True
        return self.linear

    def release(self) -> None:
        if self.gathered:
            self.owner.reshard()
            self.gathered = False


def output_head(runner, objective: Objective) -> tuple[bool, OutputHead | None]:
    """Whether the step computes its loss from features chunk by chunk (loss_chunk_tokens > 0 and
    a model that can return them), and the output projection this rank holds (None on stages
    without the output layer, where no loss is computed)."""
    if objective.cfg.loss_chunk_tokens == 0 or not all(hasattr(part, "emit_features") for part in runner.parts):
        return False, None
    owners = [part for part in runner.parts if part.output_head is not None]
    return True, (OutputHead(owners[0]) if owners else None)


@contextmanager
def emitting_features(parts: list[nn.Module], enabled: bool) -> Iterator[None]:
    """The models return their final features instead of logits inside the block (when enabled)."""
    if not enabled:
        yield
        return
    before = [part.emit_features for part in parts]
    for part in parts:
        part.emit_features = True
    try:
        yield
    finally:
        for part, value in zip(parts, before):
            part.emit_features = value


@dataclass
class StepMetrics:
    """Sums over the tokens of some micro-batches (0-d tensors; divide by `tokens` for means)."""

    loss: torch.Tensor
    mdlm: torch.Tensor
    corrector: torch.Tensor
    input_errors: torch.Tensor   # corrector inputs y that differ from x0
    output_errors: torch.Tensor  # corrector argmaxes that differ from x0
    tokens: torch.Tensor         # tokens that count (valid samples x sequence length)

    @classmethod
    def zeros(cls, device: torch.device | str) -> StepMetrics:
        return cls.from_tensor(torch.zeros(len(fields(cls)), device=device))

    @classmethod
    def of(cls, losses: Losses, token_mask: torch.Tensor) -> StepMetrics:
        terms = (losses.total, losses.mdlm, losses.corrector, losses.corrector_input_errors,
                 losses.corrector_output_errors, token_mask)
        return cls(*(t.detach().sum() for t in terms))

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> StepMetrics:
        return cls(*values.unbind())

    def as_tensor(self) -> torch.Tensor:
        return torch.stack([getattr(self, f.name) for f in fields(self)])

    def __add__(self, other: StepMetrics) -> StepMetrics:
        return StepMetrics(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def per_token(self, tokens: torch.Tensor) -> dict[str, float]:
        """The training record: each sum divided by `tokens` (fp32, as the loss itself)."""
        means = self.as_tensor()[:-1] / tokens
        names = ("loss", "mdlm_nelbo", "corrector_nll", "corrector_input_error", "corrector_output_error")
        return dict(zip(names, means.tolist()))

    def reduced(self, all_reduce) -> StepMetrics:
        """Summed over ranks by `all_reduce` (one collective for every field)."""
        return StepMetrics.from_tensor(all_reduce(self.as_tensor()))


def forward_backward(runner, batches: list[dict], objective: Objective, step: int, mode: str = "reuse",
                     backward_scale: torch.Tensor | float | None = None,
                     autocast: torch.autocast | None = None) -> StepMetrics:
    """The objective over this rank's micro-batches `batches`, through `runner`.

    With `backward_scale` each micro-batch's summed loss, times the scale, is backpropagated
    (training); None runs forward only (validation: call under no_grad). Returns the metric sums
    of all micro-batches, the same on every stage of a pipeline.
    """
    training = backward_scale is not None
    noised = [objective.noise(batch, training) for batch in batches]
    positions = [batch["position"] for batch in batches]
    rows, count = batches[0]["tokens"].shape[0], len(batches)
    device = noised[0].zt.device
    # Per micro-batch: a pipeline schedule's first step may call the loss once more, on
    # shape-inference output; the last call counts.
    metrics: dict[int, StepMetrics] = {}

    def finish(m: int, losses: Losses) -> torch.Tensor:
        metrics[m] = StepMetrics.of(losses, noised[m].token_mask)
        total = losses.total.sum()
        return total * backward_scale if training else total.detach()

    zt, sigma = torch.cat([n.zt for n in noised]), torch.cat([n.sigma for n in noised])
    # The class labels (classifier-free guidance) go in beside sigma: both passes see the same ones.
    labels = [objective.labels(batch, training) for batch in batches]
    label_input = () if labels[0] is None else (torch.cat(labels),)
    chunked, head = output_head(runner, objective)
    with autocast if autocast is not None else nullcontext(), emitting_features(runner.parts, chunked):
        if not objective.corrector_active(step):
            def plain(output: torch.Tensor, m: int) -> torch.Tensor:
                terms = objective.terms(output, head, noised[m], positions[m])
                return finish(m, objective.joint(terms, None, None, noised[m]))

            runner.run((zt, sigma, *label_input), count, rows, plain, training)
        elif mode == "reuse":
            def reuse(output: torch.Tensor, m: int) -> torch.Tensor:
                terms_zt = objective.terms(output, head, noised[m], positions[m], then="draw")
                y = terms_zt[1]
                # The corrector pass sees the same sigma (zeroed anyway without time conditioning).
                output_y = runner.forward(y, noised[m].sigma, *([] if labels[m] is None else [labels[m]]))
                terms_y = objective.terms(output_y, head, noised[m], positions[m], then="argmax")
                return finish(m, objective.joint(terms_zt, terms_y, y, noised[m]))

            runner.run((zt, sigma, *label_input), count, rows, reuse, training)
        elif mode == "two_pass":
            _two_pass(runner, noised, positions, objective, head, finish, training, labels)
        else:
            raise ValueError(f"unknown step mode {mode!r}: use reuse or two_pass")
    if head is not None:
        head.release()
    total = StepMetrics.zeros(device)
    for value in metrics.values():
        total = total + value
    return StepMetrics.from_tensor(runner.broadcast_from_last(total.as_tensor()))


def _two_pass(runner, noised: list[Noised], positions: list[torch.Tensor], objective: Objective,
              head: OutputHead | None, finish, training: bool, labels: list[torch.Tensor | None]) -> None:
    """Pass 1, forward only on z_t, takes y on the last stage (vocabulary-parallel argmax under
    tensor parallelism) and sends it to every stage; pass 2 runs the micro-batches [z_t; y] with
    the joint loss."""
    rows, count = noised[0].zt.shape[0], len(noised)
    zt = torch.cat([n.zt for n in noised])
    ys: list[torch.Tensor | None] = [None] * count

    def first_pass(output: torch.Tensor, m: int) -> torch.Tensor:
        ys[m] = objective.terms(output, head, noised[m], positions[m], nll=False, then="draw")[1]
        return torch.zeros((), device=output.device)

    label_input = () if labels[0] is None else (torch.cat(labels),)
    runner.run((zt, torch.cat([n.sigma for n in noised]), *label_input), count, rows, first_pass, training=False)
    y = torch.cat(ys) if runner.is_last else torch.empty_like(zt)
    ys = list(runner.broadcast_from_last(y).split(rows))
    tokens = torch.cat([torch.cat([n.zt, y_m]) for n, y_m in zip(noised, ys)])
    sigma = torch.cat([torch.cat([n.sigma, n.sigma]) for n in noised])
    label_input = () if labels[0] is None else (torch.cat([torch.cat([label, label]) for label in labels]),)

    def second_pass(output: torch.Tensor, m: int) -> torch.Tensor:
        output_zt, output_y = output.chunk(2)
        terms_zt = objective.terms(output_zt, head, noised[m], positions[m])
        terms_y = objective.terms(output_y, head, noised[m], positions[m], then="argmax")
        return finish(m, objective.joint(terms_zt, terms_y, ys[m], noised[m]))

    runner.run((tokens, sigma, *label_input), count, 2 * rows, second_pass, training)
