# `make demo` and `make test` work on a fresh machine: each creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first on its own so that pip takes the CPU build (no multi-GB CUDA download);
# any torch >= 2.4 already present is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"

$(VENV)/.installed-base: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[plots,cli,kernels]"
	$(BIN)/python -c "from lightning_quant.quantizers import _kernels; _kernels.load()"  # builds the fused CPU kernels (once, ~30 s)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-base
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed-base
	$(BIN)/lightning-quant fit --recipe lsq_w4a4

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/qat_accuracy.py
	$(BIN)/python benchmarks/qat_step_time.py

clean:
	rm -rf $(VENV) .cache lightning_logs wandb
