#!/usr/bin/env bash
# Test set-up: the project with its test extras, and Debian's chromium for the browser test
# (Playwright drives it; no browser is ever downloaded). Run from anywhere; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
if [ ! -x /usr/bin/chromium ]; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
