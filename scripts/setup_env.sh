#!/usr/bin/env bash
# Sourced by test.sh and demo.sh: makes .venv (once) and installs moegate into it, editable.
# A CPU-only machine gets a CPU torch (MOEGATE_TORCH, default torch==2.13.0) before anything that
# depends on torch, so pip never resolves a multi-GB CUDA build. The install re-runs only when
# setup.py, pyproject.toml or scripts/tested_versions.txt (the pinned versions of everything else
# the tests install) change. The first set-up takes a minute or two: each step says what it
# does, and pip shows what it downloads.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
setup_started=$SECONDS
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv (first run only; the next runs start at once)" >&2
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${MOEGATE_TORCH:-torch==2.13.0} from PyPI (CPU build, a few hundred MB; set" \
       "MOEGATE_TORCH to choose another)" >&2
  python -m pip install --progress-bar on -c scripts/tested_versions.txt "${MOEGATE_TORCH:-torch==2.13.0}" | grep -E "^(Collecting|Downloading|Successfully)" >&2 || true
  python -c "import torch" || { echo "setup: torch did not install; see pip's output above" >&2; exit 1; }
fi
stamp=.venv/.moegate-installed
want=$(cat setup.py pyproject.toml scripts/tested_versions.txt | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing moegate (editable) with its test and bench extras: transformers, peft," \
       "pytest, ruff, matplotlib, cuobjdump/nvdisasm" >&2
  python -m pip install --no-build-isolation -c scripts/tested_versions.txt -e ".[test,bench]" | grep -E "^(Collecting|Successfully)" >&2 || true
  python -c "import gate, lora, moegate" || { echo "setup: moegate did not install; run" \
       "'.venv/bin/python -m pip install --no-build-isolation -c scripts/tested_versions.txt -e .[test,bench]' to see why" >&2; exit 1; }
  echo "$want" > "$stamp"
  echo "setup: done in $((SECONDS - setup_started))s" >&2
fi
