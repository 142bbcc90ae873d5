"""torch.compile per transformer block, applied from outside to any model (torchtitan's order:
tp -> activation checkpointing -> compile -> FSDP2).

Each block is compiled in place with `nn.Module.compile`, which keeps the module object, its
class and its parameter names (a `torch.compile(block)` wrapper would insert `_orig_mod.` into
every name, and checkpoints would no longer load across the switch). Blocks of one model run
the same code, so they share their compiled graphs: the compile time is that of one block.

Shapes: the first call compiles for its exact shapes; when a later call brings a new batch size
(two_pass runs B rows without grad and 2B with grad, validation other sizes) dynamo recompiles
once with the batch dimension symbolic and reuses that graph for every further size. Grad mode
is part of each graph's guards, so a step with no-grad and grad passes holds a few graphs per
block code (counted in tests/test_compile.py), never one per batch size.

Activation checkpointing composes: the checkpointed forward (data_parallel.py) is traced as one
region whose activations are recomputed in backward. FSDP2's hooks run outside the graphs
(dynamo skips FSDP hooks), so FSDP2 (fsdp, ddp) wraps the compiled blocks unchanged; a pipeline
stage is a model with fewer blocks; DeepSpeed ZeRO-1/2 trains the compiled model as it is.
ParallelConfig rejects, as measured, tensor parallelism (the graphs of DTensor-sharded blocks
fail in backward) and ZeRO-3 (dynamo traces its parameter-gathering hooks and recompiles at
every call).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

from torch import nn

COMPILE_BACKEND = "inductor"  # on CPU it needs a C++ compiler (g++/clang) on the PATH


def apply_compile(blocks: Iterable[nn.Module], backend: str | None = None) -> None:
    """Compile each of `blocks` in place with `backend` (default COMPILE_BACKEND); names,
    parameters and state_dict keys do not change. Compilation itself happens at each graph's
    first call (the first training step)."""
    for block in blocks:
        block.compile(backend=backend or COMPILE_BACKEND)


def compile_problems() -> list[str]:
    """Why the blocks cannot be compiled on this machine (empty: they can): inductor writes C++
    for CPU kernels (and Triton's launcher on GPU needs a C compiler too)."""
    candidates = [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
    if any(name and shutil.which(name) for name in candidates):
        return []
    return ["parallel.compile=true needs a C++ compiler for torch.compile's inductor backend and none was found "
            "(CXX, g++, clang++, c++); install one (apt-get install g++) or set parallel.compile=false"]
