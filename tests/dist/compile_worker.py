"""Run under torchrun by tests/test_compile.py: `proseco train ARGS...` with the blocks compiled by
the backend named in PROSECO_COMPILE_BACKEND (aot_eager: dynamo's and AOTAutograd's graphs
without inductor's C++, so a multi-process launch stays quick). Each rank then prints how many
graphs it compiled, so the test can tell compiled blocks from an eager fallback."""

from __future__ import annotations

import os
import sys

from torch._dynamo.utils import counters

import parallel.compile as compile_module
from pretrain.cli import main

if __name__ == "__main__":
    compile_module.COMPILE_BACKEND = os.environ.get("PROSECO_COMPILE_BACKEND", compile_module.COMPILE_BACKEND)
    code = main(sys.argv[1:])
    print(f"compiled graphs: {counters['stats']['unique_graphs']}", flush=True)
    sys.exit(code)
