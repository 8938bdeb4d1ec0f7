#!/usr/bin/env bash
# The demo command (README): set-up, then the main demo (CPU here, the kernel on a Hopper GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
python examples/serve_router_adapters.py "$@"
