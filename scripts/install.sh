# Sourced by start.sh and test.sh: a virtual environment with zimage's requirements.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first: on a CPU machine 'torch==2.13.0' is the CPU build that lies on disk, so the
# requirements below do not pull the multi-GB CUDA build. A machine with torch keeps its own.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch
  else
    .venv/bin/python -m pip install -q torch==2.13.0
  fi
fi
.venv/bin/python -m pip install -q -r requirements.txt
