"""Evaluating an SFT run on held-out prompts: the sampler answers the validation split's prompts.

A run trained on a prompt/response folder (``proseco tokenizer shard --packing sft``) is judged
by its answers, not by unconditional samples: `held_out_prompts` reads the first prompts of the
validation split (each with its reference response, up to the first EOS), and `answer_held_out`
lets the sampler (`sampling.*`: block-wise with `block_length`, `early_eos_stop`, corrector loops)
fill the rest of each sequence after its prompt, which the sampler never rewrites. Answers are
scored against the references by exact match and by token accuracy (the fraction of reference
positions the answer holds). The end-of-run report (pretrain/report.py) uses `sft_sample_report`
for such runs; validation losses are response-only already (the folder's prompt lengths).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config import RunConfig, SamplingConfig
from pretrain.data import eval_batches
from pretrain.errors import UserError
from pretrain.sampler import Sampler
from tokenizer.format import read_manifest
from tokenizer.sft import SFT_PACKING
from tokenizer.storage import Store
from tokenizer.tokenizers import Tokenizer


@dataclass(frozen=True)
class HeldOut:
    prompt: torch.Tensor
    """BOS + the rendered prompt, int64 [P]: what the sampler is given."""
    reference: torch.Tensor
    """The reference response up to its first EOS, int64 [R]."""


def is_sft_folder(folder: str | Path) -> bool:
    """Whether a shard folder (path or URL) holds prompt/response samples with prompt lengths."""
    return read_manifest(Store(folder)).packing == SFT_PACKING


def until_eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The tokens before the first EOS (all of them without one)."""
    ends = (ids == eos_id).nonzero()
    return ids[: int(ends[0])] if len(ends) else ids


def held_out_prompts(folder: str | Path, split: str = "val", count: int = 16, *, eos_id: int) -> list[HeldOut]:
    """The first `count` samples of `split` (manifest order: the same on every run) as prompts
    with their reference responses."""
    loader = eval_batches(folder, split, micro_batch_size=max(1, min(count, 64)), max_samples=count)
    if loader.prompt_lengths is None:
        raise UserError(f"{folder} holds no prompt/response samples (its manifest's packing is not "
                        f"{SFT_PACKING!r}); shard the data with `proseco tokenizer shard --packing sft`")
    examples = []
    for batch in loader:
        for tokens, length, valid in zip(batch["tokens"], batch["prompt_length"].tolist(), batch["valid"].tolist()):
            if valid:
                examples.append(HeldOut(tokens[:length].clone(), until_eos(tokens[length:], eos_id).clone()))
    return examples


def block_length_for(sampling: SamplingConfig, generated: int) -> int | None:
    """The block length a prompt leaving `generated` positions is answered with: sampling.block_length
    when it divides them (and steps split evenly over the blocks), else the largest such length below
    it (one block of all `generated` positions at worst). Prompts vary in length and the sampler
    fills a fixed seq_len, so a fixed block length cannot fit them all."""
    if sampling.block_length is None:
        return None
    for block in range(min(sampling.block_length, generated), 0, -1):
        if generated % block == 0 and sampling.steps % (generated // block) == 0:
            return block
    return generated


def answer_held_out(model: torch.nn.Module, cfg: RunConfig, tokenizer: Tokenizer, sampling: SamplingConfig,
                    device: torch.device, examples: list[HeldOut]) -> list[dict]:
    """The sampler's answer to each prompt (one sequence each, seeded by sampling.seed + index),
    scored: response ids (up to EOS), exact_match, token_accuracy and the NFEs spent."""
    rows = []
    for index, example in enumerate(examples):
        generated = cfg.model.seq_len - len(example.prompt)
        own = dataclasses.replace(sampling, block_length=block_length_for(sampling, generated))
        result = Sampler.for_run(model, cfg, tokenizer, own, device).sample(1, prompt=example.prompt,
                                                                              seed=sampling.seed + index)
        tokens = result.tokens[0].cpu()
        if not torch.equal(tokens[: len(example.prompt)], example.prompt):
            raise RuntimeError("the sampler rewrote a prompt token")  # a bug: prompts are fixed
        answer = until_eos(tokens[len(example.prompt):], tokenizer.eos_id)
        reference = example.reference
        overlap = min(len(answer), len(reference))
        hits = int((answer[:overlap] == reference[:overlap]).sum()) if overlap else 0
        rows.append({"answer": answer.tolist(), "reference": reference.tolist(),
                     "exact_match": bool(len(answer) == len(reference) and hits == len(reference)),
                     "token_accuracy": hits / max(len(reference), 1), "block_length": own.block_length,
                     "nfe_denoiser": int(result.nfe_denoiser[0]), "nfe_corrector": int(result.nfe_corrector[0])})
    return rows


def summarize(label: str, sampling: SamplingConfig, rows: list[dict]) -> dict:
    count = max(len(rows), 1)
    denoiser = sum(r["nfe_denoiser"] for r in rows) / count
    corrector = sum(r["nfe_corrector"] for r in rows) / count
    return {"model": label, "steps": sampling.steps, "corrector_steps": sampling.corrector_steps,
            "corrector_every": sampling.corrector_every, "nfe_denoiser": denoiser, "nfe_corrector": corrector,
            "nfe_total": denoiser + corrector, "exact_match": sum(r["exact_match"] for r in rows) / count,
            "token_accuracy": sum(r["token_accuracy"] for r in rows) / count, "prompts": len(rows)}


TABLE = (("model", "model"), ("steps", "T"), ("corrector_steps", "S"), ("corrector_every", "omega"),
         ("nfe_total", "NFE total"), ("exact_match", "exact match"), ("token_accuracy", "token accuracy"))


def answers_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for _, name in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for row in rows:
        cells = [f"{row[key]:.3f}" if isinstance(row[key], float) else str(row[key]) for key, _ in TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sft_sample_report(model: torch.nn.Module, cfg: RunConfig, tokenizer: Tokenizer,
                      device: torch.device) -> tuple[str, list[dict]]:
    """The report of an SFT run: `sampling.num_samples` held-out prompts answered without and
    with correction (markdown table with two examples, the summary rows)."""
    base = cfg.sampling
    examples = held_out_prompts(cfg.data.shards, "val", base.num_samples, eos_id=tokenizer.eos_id)
    settings = [("MDLM (no correction)", dataclasses.replace(base, corrector_steps=0)),
                (f"ProSeCo (S={base.corrector_steps or 2}, every {base.corrector_every})",
                 dataclasses.replace(base, corrector_steps=base.corrector_steps or 2))]
    rows, lines = [], []
    for label, sampling in settings:
        answers = answer_held_out(model, cfg, tokenizer, sampling, device, examples)
        rows.append(summarize(label, sampling, answers))
        for example, answer in list(zip(examples, answers))[:2]:
            lines.append(f"    {label}: {tokenizer.decode(example.prompt)!r} -> {tokenizer.decode(answer['answer'])!r} "
                         f"(reference {tokenizer.decode(answer['reference'])!r})")
    header = f"answers to {len(examples)} held-out prompts of the val split:"
    return "\n".join([header, answers_table(rows), "", *lines]), rows
