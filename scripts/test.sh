#!/usr/bin/env bash
# The test command (README): set-up, lint, compile-check of every kernel (and of the torch-free
# probes in benchmarks/probes/, which use the kernels' helpers) for sm_90a, then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k lora).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
echo "== ruff" && ruff check .
if command -v nvcc >/dev/null 2>&1; then
  echo "== nvcc compile-only, sm_90a"
  for f in csrc/kernels/*.cu benchmarks/probes/*.cu; do
    nvcc -c -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -o /dev/null "$f"
    echo "ok $f"
  done
else
  echo "== nvcc not found: skipping the kernel compile check"
fi
echo "== pytest" && python -m pytest -q "$@"
