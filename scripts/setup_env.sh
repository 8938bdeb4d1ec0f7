#!/usr/bin/env bash
# Sourced by test.sh and demo.sh: makes .venv (once) and installs moegate into it, editable.
# A CPU-only machine gets a CPU torch (MOEGATE_TORCH, default torch==2.13.0) before anything that
# depends on torch, so pip never resolves a multi-GB CUDA build. The install re-runs only when
# setup.py / pyproject.toml change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${MOEGATE_TORCH:-torch==2.13.0}" >&2
  python -m pip install -q "${MOEGATE_TORCH:-torch==2.13.0}"
fi
stamp=.venv/.moegate-installed
want=$(cat setup.py pyproject.toml | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing moegate and its test/bench extras into .venv" >&2
  python -m pip install -q --no-build-isolation -e ".[test,bench]"
  echo "$want" > "$stamp"
fi
