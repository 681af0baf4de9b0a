#!/usr/bin/env bash
# The demo: two real vLLM CPU replicas behind preble-router, one prefix-sharing workload, a table per policy.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
exec "${PREBLE_VENV:-$root/.venv}/bin/python" -m benchmarks.demo "$@"
