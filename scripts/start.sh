#!/usr/bin/env bash
# Install zimage into .venv (once) and start the web studio on port 7860.
# Any arguments go to app.py, e.g.:  bash scripts/start.sh --model tiny
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
exec .venv/bin/python app.py "$@"
