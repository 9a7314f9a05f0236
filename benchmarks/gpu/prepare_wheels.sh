#!/usr/bin/env bash
# Fill benchmarks/gpu/wheels/ (git-ignored) with the Python packages that the lent GPU machine
# lacks for benchmarks/gpu/train_mfu.py; run it HERE (it needs the package registry), then carry
# the folder along to the GPU machine (see benchmarks/gpu/README.md).
#
# The GPU machine (Python 3.12, torch, transformers, triton, numpy, pyyaml, pyarrow, psutil,
# py-cpuinfo, msgpack, einops, ninja, packaging, tqdm) has no deepspeed, pydantic, hjson or peft,
# and no network. What palign's imported modules need there:
#   palign.train.data   torch (+ palign.method.prompts, palign.engines.base: standard library)
#   palign.config       pyyaml, pydantic (-> pydantic-core, annotated-types, typing-inspection,
#                       typing-extensions >= 4.16)
#   palign.train.loop   numpy, torch, pyarrow (palign.data.shards), deepspeed (-> hjson; its other
#                       requirements are on the machine already)
# so the folder gets: a pure-Python deepspeed wheel built here (no C++ ops: the benchmark uses
# torch's AdamW), and binary wheels of the rest for CPython 3.12 on manylinux x86_64.
#
#   bash benchmarks/gpu/prepare_wheels.sh            # PYTHON=... to use another interpreter
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="$HERE/wheels"
PY="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

DEEPSPEED="deepspeed==0.19.8"
# Versions that palign's tests run with here; pydantic 2.14.4 pins pydantic-core 2.50.5 and needs
# typing-extensions >= 4.16.0 (newer than what the GPU image may hold).
# peft (train.lora, the --lora rows) needs accelerate, which the image may lack.
PURE=(pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
      typing-extensions==4.16.0 peft==0.21.2 accelerate==1.15.0)
BINARY=(pydantic-core==2.50.5)

"$PY" -m pip --version >/dev/null || { echo "no pip for $PY (set PYTHON=...)" >&2; exit 1; }
rm -rf "$DEST"
mkdir -p "$DEST"

echo "== building $DEEPSPEED as a pure-Python wheel (no ops)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-binary deepspeed -w "$DEST" "$DEEPSPEED"

echo "== downloading ${PURE[*]} ${BINARY[*]} (CPython 3.12, manylinux x86_64)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any \
    -d "$DEST" "${PURE[@]}" "${BINARY[@]}"

echo "== checking"
fail=0
check() {  # check GLOB WHAT
    if ! compgen -G "$DEST/$1" >/dev/null; then echo "MISSING: $2 ($1)" >&2; fail=1; fi
}
check 'deepspeed-0.19.8-py3-none-any.whl' 'deepspeed, pure Python'
check 'pydantic-2.14.4-py3-none-any.whl' 'pydantic'
check 'pydantic_core-2.50.5-cp312-cp312-*manylinux*x86_64*.whl' 'pydantic-core for cp312'
check 'annotated_types-*.whl' 'annotated-types'
check 'typing_inspection-*.whl' 'typing-inspection'
check 'hjson-*.whl' 'hjson'
check 'typing_extensions-*.whl' 'typing-extensions'
check 'peft-0.21.2-py3-none-any.whl' 'peft'
check 'accelerate-1.15.0-py3-none-any.whl' 'accelerate'
if unzip -l "$DEST"/deepspeed-*.whl | grep -q '\.so$'; then
    echo "deepspeed wheel holds compiled ops: it will not load on the GPU machine" >&2
    fail=1
fi
[ "$fail" = 0 ] || exit 1

# Where a CPython 3.12 exists here, install the wheels into a scratch folder and import them
# (deepspeed itself needs torch, so only its files are checked).
PY312=""
for cand in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -n "$cand" ] && "$cand" -m pip --version >/dev/null 2>&1; then PY312="$cand"; break; fi
done
if [ -n "$PY312" ]; then
    scratch="$(mktemp -d)"
    "$PY312" -m pip install -q --no-deps --no-index --no-compile --target "$scratch" \
        "$DEST"/*.whl
    PYTHONPATH="$scratch" "$PY312" -c '
import annotated_types, hjson, pydantic, pydantic_core, typing_extensions, typing_inspection
class M(pydantic.BaseModel):
    x: int = 1
assert M(x="2").x == 2
print("imports under", __import__("sys").version.split()[0], "ok: pydantic", pydantic.VERSION)'
    test -f "$scratch/deepspeed/__init__.py"
    rm -rf "$scratch"
else
    echo "(no CPython 3.12 with pip here: wheels not test-installed)"
fi

ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $total bytes ($(( total / 1024 )) KiB) in $DEST"
if [ "$total" -gt $(( 60 * 1024 * 1024 )) ]; then
    echo "over 60 MiB: too much to carry (the working tree that travels is capped at 64 MiB)" >&2
    exit 1
fi
