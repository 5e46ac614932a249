#!/usr/bin/env bash
# The one command for a lent GPU machine: build csrc/ in place with that machine's own Python, then run
# bench/gpu_check.py (arguments pass through). No venv, no pip, no download: such a machine has no network, and
# its python3 already holds torch (CUDA), triton, peft, transformers and pytest, while `make setup` would create
# a venv (whose --system-site-packages does not see a python3 that is itself a venv) and pip-install the extras.
#
#   bash bench/gpu_check.sh                 # on the GPU: build (~1-2 min) + the check (budget 450 s)
#   bash bench/gpu_check.sh --budget-s 360  # less device time
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --quick   # the same path on the CPU, under the interpreter
#
# The build log (ptxas register and spill lines of the CUDA extension included) goes to $OUT (or bench/results)
# beside the check's report. A failed build is reported and the check still runs on what did build.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import sys, torch; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}')"
started=$(date +%s)
"$PY" setup.py build_ext --inplace > "$RESULTS/gpu_check-build.log" 2>&1
echo "csrc build: exit $? in $(( $(date +%s) - started )) s (log: $RESULTS/gpu_check-build.log)"
grep -E "registers|spill|error|warning: coto|skipped|failed" "$RESULTS/gpu_check-build.log" | tail -n 40
"$PY" -m coto_kernels.kernels
exec "$PY" bench/gpu_check.py "$@"
