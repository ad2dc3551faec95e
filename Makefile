# The two commands a newcomer runs: `make serve` and `make test`. Both set up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines here keep torch 2.13.0 on disk; GPU users: make setup TORCH=torch (PyPI's CUDA build).
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup vllm browser serve test test-fast bench clean wheelhouse gpu-check gpu-check-dry-run

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/fsrl fetch-default
	touch $@

# vLLM's CPU build in the same environment (tests/test_vllm_plugin.py). It pins transformers
# to its own range, and pulls torchvision, torchaudio and torchcodec, whose wheels here do not
# match torch 2.13: text models never import them, so they are removed again.
vllm: $(VENV)/.vllm-installed

$(VENV)/.vllm-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,vllm]'
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

serve: setup
	$(BIN)/fsrl serve --host $(HOST) --port $(PORT)

# The playground's browser tests drive Debian's chromium; Playwright never downloads a browser.
browser:
	@test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium)

test: setup vllm browser
	$(BIN)/python -m pytest --durations=15

# Every test but those marked slow (pyproject.toml: a subprocess server, torch.compile, sae-lens
# training, the browser, torchrun, the real default model); no browser needed.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/fsrl bench

clean:
	rm -rf $(VENV) .pytest_cache bench-results

# Where pip reaches a registry: the wheels gpu-check installs on a GPU machine that has none
# (pinned to this environment's versions; pure Python, pydantic-core per Python), into ./wheelhouse.
wheelhouse: setup
	$(BIN)/python scripts/build_wheelhouse.py

# A GPU machine: torch and transformers installed, no registry, nothing of ours; it installs the
# rest from ./wheelhouse when that was carried along (scripts/gpu_check.py). Needs no registry.
gpu-check:
	$(PYTHON) scripts/gpu_check.py

gpu-check-dry-run: setup
	$(BIN)/python scripts/gpu_check.py --dry-run
