#!/usr/bin/env bash
# The paper's experiment, every arm in turn, then `palign compare --reference paper`:
# the untrained student, plain SFT on the teacher's text, fixed ratios 0.25 / 0.5 / 0.75 and
# P-ALIGN (configs/paper/, docs/reproduce.md).
#   scripts/run_paper.sh [CONFIG_DIR] [-- extra `palign run` arguments, e.g. --set data.limit=8]
# CONFIG_DIR defaults to configs/paper/demo; runs resume where they stopped (rerun to continue).
set -euo pipefail
dir=${1:-configs/paper/demo}
shift || true
[[ ${1:-} == "--" ]] && shift
palign=${PALIGN:-palign}
outs=()
for name in base sft fixed_ratio_25 fixed_ratio_50 fixed_ratio_75 palign; do
  "$palign" run "$dir/$name.yaml" "$@"
  outs+=("$("$palign" validate --skip-paths "$dir/$name.yaml" "$@" | sed -n 's/^  output_dir: //p' | head -1)")
done
"$palign" compare "${outs[@]}" --reference paper --json "${outs[-1]%/*}/compare.json" \
  --plot "${outs[-1]%/*}/compare_reference.png"
