"""Run under torchrun (2 processes, gloo) by tests/test_convert.py.

    logits CHECKPOINT OUT.json [a=b ...]

At tp=2 and at pp=2 (two-pass), the model is given an imported checkpoint's weights twice: by
DCP resharding (its EMA loaded into the parallel parts) and by model.init_from; each time the
logits of a fixed batch are compared with a one-process load of the same checkpoint. The tp=2
trainer then saves a checkpoint of its own (tp=2 shards) for the test to export. Rank 0 writes
the largest differences to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from parallel.env import DistEnv, detect_launch, init_distributed
from pretrain.checkpoint import dcp_load, load_model
from pretrain.config import load_config, validate
from pretrain.train import Trainer

LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2", "train.step_mode=two_pass"]}


def logits_of(trainer: Trainer, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full logits of `tokens` on this layout (None on a pipeline rank without the output layer)."""
    for part in trainer.parts:
        part.eval()
    sigma = torch.zeros(tokens.shape[0])
    if trainer.layout.pp == 1:
        with torch.no_grad():
            out = trainer.parts[0](tokens, sigma)
        return out.full_tensor() if isinstance(out, DTensor) else out
    captured = {}

    def keep(output, microbatch):
        captured["logits"] = output.detach()
        return output.sum() * 0

    trainer.runner.run((tokens, sigma), 1, tokens.shape[0], keep, training=False)
    return captured.get("logits")


def gathered_error(logits: torch.Tensor | None, reference: torch.Tensor) -> float:
    """The largest |logits - reference| over the ranks that hold logits (collective)."""
    mine = (logits - reference).abs().max().item() if logits is not None else -1.0
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, mine)
    return max(errors)


def compare(checkpoint: str, out: str, overrides: list[str], env: DistEnv) -> None:
    reference_model, cfg, tokenizer = load_model(checkpoint)
    tokens = torch.randint(0, tokenizer.vocab_size, (4, cfg.model.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = reference_model(tokens)
    results = {"scale": reference.abs().max().item()}
    for name, layout in LAYOUTS.items():
        base = [*overrides, *layout, f"logging.run_dir={Path(out).parent / name}"]
        cfg = load_config(None, base)
        validate(cfg, env.world_size)
        resharded = Trainer(cfg, env)  # its seeded initialisation, then the checkpoint's EMA by DCP
        dcp_load({"ema": resharded.ema.shadow}, Path(checkpoint), no_dist=False)
        resharded.ema.swap()
        results[f"{name}_dcp"] = gathered_error(logits_of(resharded, tokens), reference)
        initialised = Trainer(load_config(None, [*base, f"model.init_from={checkpoint}"]), env)
        results[f"{name}_init_from"] = gathered_error(logits_of(initialised, tokens), reference)
        if name == "tp2":
            initialised._save()  # a checkpoint in tp=2 shards, for the test to export
    if env.rank == 0:
        Path(out).write_text(json.dumps(results))


def main() -> None:
    command, checkpoint, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    env = init_distributed(detect_launch(), "cpu", 60.0)
    if command == "logits":
        compare(checkpoint, out, overrides, env)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
