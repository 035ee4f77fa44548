PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ASSETS ?= ../shared/assets
export DIYGPT_TOKENIZER_DIR ?= $(abspath $(ASSETS)/gpt2)
export DIYGPT_ASSETS ?= $(abspath $(ASSETS))
# Where pip does not find the CPU wheel of torch by itself (public PyPI on Linux gives the
# CUDA build): make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: setup setup-test demo test lint gpu-stage clean

# What diygpt needs to run (`make demo`); the test tools come on top, for `make test` only.
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "setting up $(VENV): torch and diygpt (first time: a minute or more)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

# triton goes in a folder of its own, which only the tests put on their path (they run
# diygpt.fused_ce's GPU kernels in its CPU interpreter): in the venv's packages, every
# training run would load it (torch's optimizers import it when present), 75 MB more RSS.
$(VENV)/.installed-test: $(VENV)/.installed
	@echo "adding the test tools to $(VENV): pytest, transformers, hypothesis, ruff, triton"
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --upgrade -c constraints.txt --target $(VENV)/triton-tests triton
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

# A GPT-2-style model, smaller than book-124m (256 wide, 4 layers) so the demo trains in a few
# minutes on two CPU cores; `scripts/seed_run.sh` runs the full-size seed configuration.
demo: setup
	@echo "training a 4-layer GPT on the-verdict into runs/demo (replaced each time): a few minutes on 2 CPU cores"
	rm -rf runs/demo
	$(VENV)/bin/diygpt train --data $(ASSETS)/the-verdict.txt --preset book-124m \
	  --emb-dim 256 --n-heads 4 --n-layers 4 --epochs 15 --batch-size 2 --lr 0.001 \
	  --weight-decay 0.1 --eval-freq 10 --eval-iter 2 --seed 123 \
	  --sample-prompt "Every effort moves you" --out runs/demo
	$(VENV)/bin/diygpt generate --checkpoint runs/demo --prompt "Every effort moves you" \
	  --max-new-tokens 40 --temperature 1.0 --top-k 25 --seed 123
	@echo "loss plot: runs/demo/loss.png   checkpoint: runs/demo/"

test: setup-test
	$(VENV)/bin/ruff check src tests bench scripts
	$(PY) -m pytest -q

lint: setup-test
	$(VENV)/bin/ruff check src tests bench scripts

# The assets for a lent GPU machine, which gets the working tree but not ../shared:
# then run `bash bench/gpu.sh` there with .assets carried (see the script's header).
gpu-stage:
	mkdir -p .assets/gpt2
	cp -f $(ASSETS)/the-verdict.txt .assets/
	cp -f $(ASSETS)/gpt2/encoder.json $(ASSETS)/gpt2/vocab.bpe .assets/gpt2/

# Only the demo's run: runs/ may hold the user's own training runs.
clean:
	rm -rf $(VENV) runs/demo build dist src/*.egg-info
