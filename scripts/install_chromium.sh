#!/usr/bin/env bash
# Headless Chromium from Debian's packages, for the test that renders report.html
# (tests/e2e/test_report_render.py; without it that test is skipped, saying how to install it).
# Needs root and apt; does nothing when chromium is already there. Not pinned: Debian's
# security updates replace the version, and the test needs only a headless renderer.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium: not installed (needs root and apt-get); the render test will be skipped" >&2
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
