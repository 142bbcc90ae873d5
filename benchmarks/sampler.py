"""Sampler overhead: wall time per NFE against one bare forward of the same batch.

The default model (configs/shakespeare.yaml shape), batch 16, T = 32, with and without a corrector
loop after every step, caching off so that every NFE is a full-batch forward. The overhead is
what the sampler adds around the network (softmax, float64 posterior draws, bookkeeping): the
sampling run's wall time over the time spent inside the same run's model forwards, measured
together so that a busy machine slows both alike. A separately timed bare forward is reported
too, as a check.

    python -m benchmarks.sampler
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import torch

from pretrain.config import DiffusionConfig, load_config
from pretrain.diffusion import NoiseSchedule
from pretrain.models import ModelShape
from pretrain.models.dit.model import DiT
from pretrain.sampler import Sampler

CONFIG = "configs/shakespeare.yaml"
VOCAB, SEQ_LEN, BATCH, STEPS = 128, 128, 16, 32  # the default char model (vocabulary padded to 128)


def _forward_seconds(model, rounds: int = 9) -> float:
    tokens = torch.randint(5, VOCAB, (BATCH, SEQ_LEN))
    sigma = torch.zeros(BATCH)
    times = []
    with torch.no_grad():
        model(tokens, sigma)
        for _ in range(rounds):
            start = time.perf_counter()
            model(tokens, sigma)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class _TimedModel(torch.nn.Module):
    """The model, with the wall time of every forward call added up."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seconds = model, 0.0

    def forward(self, *args):
        start = time.perf_counter()
        out = self.model(*args)
        self.seconds += time.perf_counter() - start
        return out


def _sampler_run(model, sampling) -> tuple[float, float, float, float]:
    """(wall seconds per NFE, forward seconds per NFE, mean NFE, samples/s) of one sampling run."""
    timed = _TimedModel(model)
    sampler = Sampler(timed, sampling, mask_id=4, vocab_size=VOCAB, seq_len=SEQ_LEN,
                      schedule=NoiseSchedule(DiffusionConfig()))
    start = time.perf_counter()
    result = sampler.sample(BATCH)
    seconds = time.perf_counter() - start
    nfe = result.nfe_total.float().mean().item()  # every NFE is one forward of the whole batch here
    return seconds / nfe, timed.seconds / nfe, nfe, BATCH / seconds


def run() -> list[dict]:
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = DiT(cfg.model, ModelShape(VOCAB, SEQ_LEN)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    plain = dataclasses.replace(cfg.sampling, steps=STEPS, batch_size=BATCH, use_cache=False, corrector_steps=0)
    corrected = dataclasses.replace(plain, corrector_steps=1, corrector_every=1)
    forward = _forward_seconds(model)
    per_nfe_plain, forward_plain, _, samples_plain = _sampler_run(model, plain)
    per_nfe_corrected, forward_corrected, nfe_corrected, samples_corrected = _sampler_run(model, corrected)
    forward = min(forward, _forward_seconds(model))  # measured before and after: the lower is the machine's
    setup = (f"{cfg.model.n_layers} x {cfg.model.d_model} DiT, vocab {VOCAB}, L={SEQ_LEN}, batch {BATCH}, T={STEPS}, "
             f"float64 sampling, cache off, {torch.get_num_threads()} threads")
    return [
        {"name": "sampler_time_per_nfe_over_forward", "value": round(per_nfe_plain / forward_plain, 3),
         "unit": "ratio", "what": f"MDLM sampler wall time per NFE / time per forward inside the same run; target "
                                  f"<= 1.05; {setup}"},
        {"name": "sampler_time_per_nfe_over_forward_corrected",
         "value": round(per_nfe_corrected / forward_corrected, 3),
         "unit": "ratio", "what": f"same with a corrector loop (S=1) after every step ({nfe_corrected:.0f} NFE); "
                                  f"{setup}"},
        {"name": "sampler_time_per_nfe_over_bare_forward", "value": round(per_nfe_plain / forward, 3), "unit": "ratio",
         "what": f"MDLM sampler wall time per NFE / a bare forward timed before and after the run (noisier on a "
                 f"shared machine); {setup}"},
        {"name": "sampler_samples_per_s", "value": round(samples_plain, 2), "unit": "samples/s",
         "what": f"MDLM sampling throughput (no correction); {setup}"},
        {"name": "sampler_samples_per_s_corrected", "value": round(samples_corrected, 2), "unit": "samples/s",
         "what": f"ProSeCo sampling throughput (S=1 every step); {setup}"},
    ]


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
