#!/usr/bin/env bash
# Install zimage into .venv (once) and start the web studio on port 7860.
# Any arguments go to app.py, e.g.:  bash scripts/start.sh --model tiny
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
# Gradio's cache (the images a page shows, uploads) goes to a folder of zimage's own next to
# outputs/, never the shared /tmp/gradio: the purge cleans it. A folder set already wins.
if [ -z "${ZIMAGE_GRADIO_CACHE_DIR:-}" ] && [ -z "${GRADIO_TEMP_DIR:-}" ]; then
  export ZIMAGE_GRADIO_CACHE_DIR="$PWD/.cache/gradio"
fi
exec .venv/bin/python app.py "$@"
