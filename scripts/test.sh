#!/usr/bin/env bash
# Install zimage and its test tools into .venv, then lint and run the whole test suite on the CPU.
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` runs the fast core (no process,
# server or browser started; under a minute), `bash scripts/test.sh tests/test_engine.py` one file.
set -euo pipefail
cd "$(dirname "$0")/.."
ZIMAGE_REQUIREMENTS=requirements-test.txt source scripts/install.sh
# The browser test drives Debian's Chromium through Playwright (no browser download), and the
# Chinese page needs a CJK font.
if { [ ! -x /usr/bin/chromium ] || ! fc-list 2>/dev/null | grep -qi "wenquanyi micro hei"; } \
  && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null) \
    || echo "warning: could not install chromium; the browser test will fail" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q --timeout=600 "$@"
