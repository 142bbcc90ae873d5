# The README's commands. Each creates .venv on first use and installs what it needs.
#   make pretrain   tokenizer + shards for the default corpus, then the default CPU run
#   make test       the test suite (what CI runs)
#   make bench      benchmarks -> docs/benchmarks.md and docs/benchmarks.json
#   make lint       ruff over the tree (CI runs it next to make test)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU cluster install your CUDA torch first and set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,eval,gpt2,wandb
CONFIG ?= configs/shakespeare.yaml
export OMP_NUM_THREADS ?= 2

.PHONY: pretrain test test-all lint bench data docs clean-venv

$(VENV)/.installed: pyproject.toml requirements/no-deps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps -r requirements/no-deps.txt
	touch $@

data/shakespeare/tokenizer/tokenizer.json: | $(VENV)/.installed
	$(VENV)/bin/proseco tokenizer train --corpus shakespeare --kind char --out data/shakespeare/tokenizer

data/shakespeare/shards/manifest.json: data/shakespeare/tokenizer/tokenizer.json
	$(VENV)/bin/proseco tokenizer shard --corpus shakespeare --tokenizer data/shakespeare/tokenizer --seq-len 128 --packing pack --out data/shakespeare/shards

data: data/shakespeare/shards/manifest.json

pretrain: $(VENV)/.installed data
	$(VENV)/bin/proseco train $(CONFIG)

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(VENV)/.installed data
	$(PY) -m benchmarks.run

docs: $(VENV)/.installed
	$(VENV)/bin/proseco config docs --out docs/config.md

clean-venv:
	rm -rf $(VENV)
