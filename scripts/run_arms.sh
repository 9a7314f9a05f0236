#!/usr/bin/env bash
# The paper's comparison, end to end: the shared run (teacher CoTs and the "before" row), the
# three arms (full CoT, fixed ratio 0.25, P-ALIGN), then `palign compare` of all four.
#   scripts/run_arms.sh [CONFIG_DIR] [-- extra `palign run` arguments, e.g. --set data.limit=8]
# CONFIG_DIR defaults to configs/arms/demo; runs resume where they stopped (rerun to continue).
set -euo pipefail
dir=${1:-configs/arms/demo}
shift || true
[[ ${1:-} == "--" ]] && shift
palign=${PALIGN:-palign}
outs=()
for name in shared full_cot fixed_ratio palign; do
  "$palign" run "$dir/$name.yaml" "$@"
  outs+=("$("$palign" validate --skip-paths "$dir/$name.yaml" "$@" | sed -n 's/^  output_dir: //p' | head -1)")
done
"$palign" compare "${outs[@]}" --json "${outs[-1]%/*}/compare.json"
