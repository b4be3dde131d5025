#!/usr/bin/env bash
# The one device check of a lent GPU (see bench/bench_gpu_check.py): prints one Markdown table on stdout.
#   bash bench/gpu_check.sh > gpu_check.md            # full check, < 8 minutes on an H200
#   bash bench/gpu_check.sh --device cpu --tiny       # dry run of the structure on a CPU
# Extra arguments go to bench/bench_gpu_check.py. PYTHON overrides the interpreter (default: .venv/bin/python
# when present, else python3). A hard limit of 470 s (GPU_CHECK_LIMIT_S) interrupts the script, which
# still prints the rows it has.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"   # parallel nvcc jobs of the JIT extension build
exec timeout -s INT -k 20 "${GPU_CHECK_LIMIT_S:-470}" "$PYTHON" -m bench.bench_gpu_check "$@"
