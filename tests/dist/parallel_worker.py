"""Run under torchrun by tests/test_parallel.py (gloo, CPU).

    parity SHARDS OUT.json          every layout this world size allows against one process
    continue OUT.json [a=b ...]     resume at this layout, dump what was loaded, train on
    train [a=b ...]                 `proseco train` with overrides (PROSECO_TEST_DIE kills a rank)

Rank 0 writes OUT.json; tests read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from parallel.data_parallel import global_grad_norm
from parallel.env import DistEnv, detect_launch, init_distributed
from pretrain.checkpoint import app_state
from pretrain.config import load_config, validate
from pretrain.model import DiT
from pretrain.train import Trainer, train

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.cond_dim=16", "model.vocab_multiple=8",
        "data.global_batch_size=8", "data.micro_batch_size=2", "data.num_workers=0", "logging.progress=false",
        "optim.warmup_steps=0"]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def digest(tensor: torch.Tensor) -> str:
    """Hash of the full tensor's bytes: equal digests mean bit-identical tensors."""
    return hashlib.sha256(full(tensor).detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def one_step(trainer: Trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss terms and full gradients of the first global batch, on this trainer's layout."""
    batches = iter(trainer.loader)
    sums = trainer.forward_backward([next(batches) for _ in range(trainer.accum)])
    for name, p in trainer.model.named_parameters():  # final gradients, not deferred partial sums
        assert not any(pl.is_partial() for pl in getattr(p.grad, "placements", ())), name
    grads = {name: full(p.grad).clone() for name, p in trainer.model.named_parameters()}
    grads["global_norm"] = global_grad_norm(trainer.model.parameters()).reshape(1)  # what clipping sees
    trainer.optimizer.zero_grad(set_to_none=True)
    return sums, grads


@torch.no_grad()
def random_init(model) -> None:
    """Non-zero weights everywhere: at the real initialisation the zero adaLN gates give every
    attention and MLP weight a zero gradient, which would make parity trivial."""
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def layouts(world: int) -> list[list[str]]:
    if world == 2:
        return [["parallel.dp=2", "parallel.data_parallel=fsdp"], ["parallel.dp=2", "parallel.data_parallel=ddp"],
                ["parallel.dp=2", "parallel.data_parallel=fsdp_no_reshard", "parallel.activation_checkpointing=true"],
                ["parallel.tp=2"], ["parallel.tp=2", "parallel.sequence_parallel=true"]]
    if world == 4:
        return [["parallel.dp=2", "parallel.tp=2"],
                ["parallel.dp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.data_parallel=ddp"]]
    raise SystemExit(f"no layouts for world size {world}")


def parity(shards: str, out: str, env: DistEnv) -> None:
    DiT.init_weights = random_init
    results = []
    single = DistEnv(0, 1, 0, env.device, "single")
    for mode in ("reuse", "two_pass"):
        base = [f"data.shards={shards}", f"train.step_mode={mode}", "logging.run_dir=/tmp/unused", *TINY]
        reference = Trainer(load_config(None, base), single)
        ref_sums, ref_grads = one_step(reference)
        for layout in layouts(env.world_size):
            cfg = load_config(None, [*base, *layout])
            validate(cfg, env.world_size)
            sums, grads = one_step(Trainer(cfg, env))
            grad_error = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
            grad_scale = max(g.abs().max().item() for g in ref_grads.values())
            results.append({"mode": mode, "layout": " ".join(layout), "loss": sums[0].item(),
                            "reference_loss": ref_sums[0].item(), "loss_error": (sums - ref_sums).abs().max().item(),
                            "grad_error": grad_error, "grad_scale": grad_scale,
                            "names_match": sorted(grads) == sorted(ref_grads)})
    if env.rank == 0:
        with open(out, "w") as stream:
            json.dump(results, stream, indent=1)


def dump_digests(trainer: Trainer) -> dict:
    """Digests of the full weights, EMA and Adam moments a trainer holds, and its data position."""
    state = app_state(trainer.model, trainer.optimizer, trainer.ema.shadow)
    flat = {}
    for section in ("model", "ema"):
        for name, tensor in state[section].items():
            flat[f"{section}.{name}"] = digest(tensor)
    for name, entry in state["optim"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            flat[f"optim.{name}.{key}"] = digest(entry[key])
    return {"state": flat, "data": trainer.loader.state_dict(), "step": trainer.state.step}


def resume_dump_and_train(out: str, overrides: list[str], env: DistEnv) -> None:
    """Resume at this layout, write what was loaded, then train on to train.max_steps."""
    trainer = Trainer(load_config(None, [*TINY, *overrides]), env)
    trainer._resume()
    digests = dump_digests(trainer)
    if env.rank == 0:
        with open(out, "w") as stream:
            json.dump(digests, stream)
    trainer.run()


def die_on_request() -> None:
    """PROSECO_TEST_DIE=rank=R,step=S: rank R exits abruptly (code 17) before optimizer step S."""
    spec = dict(item.split("=") for item in os.environ.get("PROSECO_TEST_DIE", "").split(",") if item)
    if not spec or int(os.environ["RANK"]) != int(spec["rank"]):
        return
    original = Trainer._train_step

    def step(self, micro_batches):
        if self.state.step == int(spec["step"]):
            os._exit(17)
        return original(self, micro_batches)

    Trainer._train_step = step


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "train":
        die_on_request()
        train(load_config(None, [*TINY, *args]))
        return
    env = init_distributed(detect_launch(), "cpu", 60.0)
    if command == "parity":
        parity(args[0], args[1], env)
    elif command == "continue":
        resume_dump_and_train(args[0], args[1:], env)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
