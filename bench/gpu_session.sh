#!/usr/bin/env bash
# Runs on the GPU machine (device tool), in the foreground of one call: install the carried
# wheels (with bytecode), build the full-size random model on local disk, then the given steps
# within a wall budget, writing results to $OUT as they come (what is there comes back even when
# the call is cut off).
#   OUT=... WHL=../.whl BUDGET_S=540 bash bench/gpu_session.sh "<steps>"
#   steps: rows:<row,row> imports probe explore   (space separated, run in that order)
set -u
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
DEADLINE=$((T0 + BUDGET_S))
OUT=${OUT:-/tmp/zb}
WHL=${WHL:-.whl}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 HF_HUB_OFFLINE=1
left() { echo $((DEADLINE - $(date +%s))); }
echo "== start $(date +%T)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -z "${SKIP_INSTALL:-}" ]; then  # SKIP_INSTALL=1: a dry run where the packages are installed
  if [ ! -d /tmp/site/diffusers ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
    python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1
  fi
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -m compileall -q -j 0 zimage >/dev/null 2>&1
echo "== installed $(( $(date +%s) - T0 ))s"
python3 -c "import torch,transformers,diffusers,gradio;print('torch',torch.__version__,'transformers',transformers.__version__,'diffusers',diffusers.__version__,'gradio',gradio.__version__)"
M=${M:-/tmp/zmodel}
[ -f $M/zimage_fullsize.json ] || /usr/bin/time -f "build %e s" python3 -m zimage bench build --model $M
echo "== built $(( $(date +%s) - T0 ))s"; du -sh $M; df -h /tmp | tail -1
( sync; echo 3 > /proc/sys/vm/drop_caches ) && echo "drop_caches works" || echo "drop_caches refused"
for step in $1; do
  echo "== $step $(date +%T), $(left)s left"
  case $step in
    rows:*) python3 -m zimage bench run --model $M --workdir /tmp/zw --rows "${step#rows:}" --out "$OUT/rows.json" \
              --deadline "$DEADLINE" --min-left 45 --row-timeout 240 ${BENCH_ARGS:-} 2>&1 | tail -40
            for d in /tmp/zw/app-*; do [ -f "$d/app.log" ] && cp "$d/app.log" "$OUT/$(basename "$d").log"; done ;;
    imports) [ "$(left)" -gt 40 ] && python3 -m zimage bench imports --model $M --workdir "$OUT" > "$OUT/imports.log" 2>&1; tail -c 1500 "$OUT/imports.log" ;;
    probe) python3 -m zimage bench probe --model $M --workdir /tmp/zw > "$OUT/probe.log" 2>&1; tail -3 "$OUT/probe.log" ;;
    explore) python3 -m zimage bench explore --model $M --workdir /tmp/zw --compile-cache /tmp/zw/explore-inductor > "$OUT/explore.log" 2>&1; tail -3 "$OUT/explore.log" ;;
  esac
done
echo "== done $(date +%T), $(( $(date +%s) - T0 ))s"
