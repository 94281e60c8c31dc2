# Sourced by start.sh and test.sh: zimage installed into .venv with `pip install -e .` (so
# .venv/bin/zimage exists and `import zimage` works from any folder), with its requirements.
#
# pip runs only when something it installs from changed: a stamp in .venv holds the hash of the
# requirement files, pyproject.toml and the Python version. An unchanged checkout starts without
# pip and without network. ZIMAGE_REQUIREMENTS adds requirement files (test.sh: the test tools).
PY=${PYTHON:-python3}
_zi_reqs="requirements.txt ${ZIMAGE_REQUIREMENTS:-}"
_zi_stamp=.venv/.zimage-installed

_zi_hash() {
  { cat $_zi_reqs pyproject.toml; .venv/bin/python -c 'import sys; print(sys.version)'; } 2>/dev/null \
    | sha256sum | cut -c1-16
}

if [ -x .venv/bin/python ] && [ -f "$_zi_stamp" ] && [ "$(cat "$_zi_stamp")" = "$(_zi_hash)" ]; then
  echo "zimage: .venv is up to date (requirements unchanged); no pip run." >&2
else
  echo "zimage: installing into .venv; the first time downloads several GB (torch, diffusers, gradio...)." >&2
  if [ ! -x .venv/bin/python ]; then
    echo "zimage: [1/4] creating .venv with $PY" >&2
    "$PY" -m venv .venv
  fi
  echo "zimage: [2/4] pip itself" >&2
  .venv/bin/python -m pip install --progress-bar on --upgrade pip
  # torch first: on a CPU machine 'torch==2.13.0' is the CPU build that lies on disk, so the
  # requirements below do not pull the multi-GB CUDA build. A machine with torch keeps its own.
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      echo "zimage: [3/4] torch (CUDA build, about 2.5 GB)" >&2
      .venv/bin/python -m pip install --progress-bar on torch
    else
      echo "zimage: [3/4] torch (CPU build)" >&2
      .venv/bin/python -m pip install --progress-bar on torch==2.13.0
    fi
  else
    echo "zimage: [3/4] torch is installed already" >&2
  fi
  echo "zimage: [4/4] zimage and its requirements ($_zi_reqs)" >&2
  _zi_args=""
  for _zi_f in $_zi_reqs; do _zi_args="$_zi_args -r $_zi_f"; done
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install --progress-bar on $_zi_args -e .
  _zi_hash >"$_zi_stamp"
  echo "zimage: installed; .venv/bin/zimage and .venv/bin/python are ready." >&2
fi
