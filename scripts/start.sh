#!/usr/bin/env bash
# Install zimage into .venv (once, and again only when its requirements change) and start the
# web studio on port 7860. Any arguments go to app.py, e.g.:  bash scripts/start.sh --model tiny
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
# Gradio's cache (the images a page shows, uploads) goes to a folder of zimage's own next to
# outputs/, never the shared /tmp/gradio: the purge cleans it. A folder set already wins.
if [ -z "${ZIMAGE_GRADIO_CACHE_DIR:-}" ] && [ -z "${GRADIO_TEMP_DIR:-}" ]; then
  export ZIMAGE_GRADIO_CACHE_DIR="$PWD/.cache/gradio"
fi
# The studio runs as a child process (not exec'd over this shell), so its start time, from which
# the page, /ready and the log count the model's load, is the Python start and not this script's
# pip run. It runs in a session of its own; Ctrl-C, SIGTERM and SIGHUP reach it once, as SIGTERM
# (a graceful stop; a second one stops at once), and its exit code is this script's.
if command -v setsid >/dev/null 2>&1; then
  setsid .venv/bin/python app.py "$@" <&0 &
else
  .venv/bin/python app.py "$@" <&0 &
fi
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM HUP
status=0
while true; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break
done
exit "$status"
