#!/usr/bin/env bash
# The README's pictures, from a finished demo run (make demo) and its audit
# (palign audit configs/demo.yaml --sample 8): the run report in headless Chromium
# (Debian's chromium package) and the audit's calibration plot.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/demo}
mkdir -p docs/images
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: run as root; --disable-dev-shm-usage: containers have a small /dev/shm
chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
    --user-data-dir="$profile" --hide-scrollbars --window-size=1280,3200 \
    --screenshot="$profile/page.png" "file://$PWD/$run/report.html" 2>/dev/null
# the page's top (overview, stages) is text; keep from the stage table to the first row open
.venv/bin/python - "$profile/page.png" docs/images/report.png <<'PY'
import sys
from PIL import Image
page = Image.open(sys.argv[1]).convert("RGB")
part = page.crop((0, 420, 1280, 3200))
small = part.resize((900, round(part.height * 900 / 1280)))
small.quantize(colors=64).save(sys.argv[2], optimize=True)  # a few hundred KB
PY
cp "$run/audit/calibration.png" docs/images/calibration.png
ls -l docs/images/report.png docs/images/calibration.png
