#!/usr/bin/env bash
# Runs on the GPU machine (device tool): install carried wheels with bytecode, build the
# full-size random model on local disk, then run the given benchmark steps in the background
# (setsid) so that the work outlives one tool call. Logs and results land in /tmp/zb.
#   bash bench/gpu_session.sh "<steps>"   steps: probe explore rows:<row,row> (space separated)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
mkdir -p /tmp/zb
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -m compileall -q /tmp/site >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -m compileall -q zimage >/dev/null 2>&1
M=/tmp/zmodel
{
  echo "== start $(date +%T)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch,transformers,accelerate;print('torch',torch.__version__,'transformers',transformers.__version__,'accelerate',accelerate.__version__)"
  [ -f $M/zimage_fullsize.json ] || { /usr/bin/time -f "build %e s" python3 -m zimage bench build --model $M; }
  du -sh $M/*; df -h /tmp | tail -1
  for step in $1; do
    echo "== $step $(date +%T)"
    case $step in
      probe) python3 -m zimage bench probe --model $M --workdir /tmp/zw > /tmp/zb/probe.log 2>&1; tail -3 /tmp/zb/probe.log ;;
      explore) python3 -m zimage bench explore --model $M --workdir /tmp/zw --compile-cache /tmp/zw/explore-inductor > /tmp/zb/explore.log 2>&1; tail -3 /tmp/zb/explore.log ;;
      rows:*) python3 -m zimage bench run --model $M --workdir /tmp/zw --rows ${step#rows:} --out /tmp/zb/rows-$(date +%H%M%S).json ${BENCH_ARGS:-} > /tmp/zb/rows-$(date +%H%M%S).log 2>&1 ;;
    esac
  done
  echo "== done $(date +%T)"
} > /tmp/zb/session.log 2>&1
