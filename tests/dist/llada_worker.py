"""Run under torchrun (2 processes, gloo, CPU) by tests/test_llada.py: a tiny LLaDA at tp=2 and
pp=2 against one process, in one launch.

    check CHECKPOINT SHARDS OUT.json

- logits: the imported checkpoint (a Hugging Face folder of random weights in the published
  layout) loaded at tp=2 and at pp=2 (two-pass), by DCP resharding and by model.init_from, gives
  the one-process logits of a fixed batch;
- loss and gradients: one step from random weights at dp=2 (FSDP2, chunked logits), tp=2 (with
  and without sequence parallelism, whole and chunked logits) and pp=2 (GPipe and 1F1B,
  two-pass) gives the loss terms, every gradient and the global gradient norm of one process.

Rank 0 writes the largest differences to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.env import DistEnv, detect_launch, init_distributed
from pretrain.checkpoint import dcp_load, load_model
from pretrain.config import load_config, validate
from pretrain.models.llada.model import LLaDA
from pretrain.train import Trainer
from tests.dist.convert_worker import gathered_error, logits_of
from tests.dist.parallel_worker import one_step, random_init

TINY = ["model.family=llada", "model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
        "model.mlp_hidden_size=48", "model.vocab_multiple=8", "data.global_batch_size=8", "data.micro_batch_size=2",
        "data.num_workers=0", "logging.progress=false", "optim.warmup_steps=0"]
LOGIT_LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2", "train.step_mode=two_pass"]}
CHUNKS = "diffusion.loss_chunk_tokens=5"
PP = ["parallel.pp=2", "train.step_mode=two_pass"]
GRAD_LAYOUTS = [["parallel.dp=2", "parallel.data_parallel=fsdp", CHUNKS],
                ["parallel.tp=2"], ["parallel.tp=2", CHUNKS],
                ["parallel.tp=2", "parallel.sequence_parallel=true", CHUNKS],
                [*PP, "parallel.pp_schedule=gpipe"], [*PP, CHUNKS, "parallel.pp_schedule=1f1b"]]


def logits(checkpoint: str, run_root: Path, overrides: list[str], env: DistEnv) -> dict[str, float]:
    reference_model, cfg, tokenizer = load_model(checkpoint)
    tokens = torch.randint(0, tokenizer.vocab_size, (4, cfg.model.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = reference_model(tokens)
    results = {"logit_scale": reference.abs().max().item()}
    for name, layout in LOGIT_LAYOUTS.items():
        base = [*overrides, *layout, f"logging.run_dir={run_root / name}"]
        cfg = load_config(None, base)
        validate(cfg, env.world_size)
        resharded = Trainer(cfg, env)  # its seeded initialisation, then the checkpoint's EMA by DCP
        dcp_load({"ema": resharded.ema.shadow}, Path(checkpoint), no_dist=False)
        resharded.ema.swap()
        results[f"{name}_dcp"] = gathered_error(logits_of(resharded, tokens), reference)
        initialised = Trainer(load_config(None, [*base, f"model.init_from={checkpoint}"]), env)
        results[f"{name}_init_from"] = gathered_error(logits_of(initialised, tokens), reference)
    return results


def gradients(overrides: list[str], env: DistEnv) -> list[dict]:
    LLaDA.init_weights = random_init  # the same non-zero weights on every layout (and larger than init_std's)
    single = DistEnv(0, 1, 0, env.device, "single")
    results = []
    for mode in ("reuse", "two_pass"):
        base = [*overrides, f"train.step_mode={mode}", "diffusion.loss_chunk_tokens=0"]
        ref_sums, ref_grads = one_step(Trainer(load_config(None, base), single))
        for layout in GRAD_LAYOUTS:
            if mode == "reuse" and "parallel.pp=2" in layout:
                continue  # reuse needs the whole model in one stage (the config rejects it)
            cfg = load_config(None, [*base, *layout])
            validate(cfg, env.world_size)
            sums, grads = one_step(Trainer(cfg, env))
            errors = {n: (grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads}
            results.append({"mode": mode, "layout": " ".join(layout), "reference_loss": ref_sums["loss"],
                            "loss_error": max(abs(sums[k] - ref_sums[k]) for k in ref_sums),
                            "grad_error": max(errors.values()), "worst": max(errors, key=errors.get),
                            "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
                            "names_match": sorted(grads) == sorted(ref_grads)})
    return results


def main() -> None:
    command, checkpoint, shards, out = sys.argv[1:5]
    env = init_distributed(detect_launch(), "cpu", 60.0)
    if command == "check":
        root = Path(out).parent
        overrides = [*TINY, f"data.shards={shards}", f"logging.run_dir={root / 'unused'}"]
        results = logits(checkpoint, root, overrides, env)
        results["gradients"] = gradients(overrides, env)
        if env.rank == 0:
            Path(out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
