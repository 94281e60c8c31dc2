#!/usr/bin/env bash
# The several-GPU benchmark's steps (issue 13), started in the background by gpus_session.sh.
# Results: /tmp/zb/*.json; each step's log beside it; /tmp/zb/done at the end.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
B="python3 bench/gpus_bench.py"
echo "== start $(date +%T)"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch,diffusers,transformers,gradio;print('torch',torch.__version__,'diffusers',diffusers.__version__,'transformers',transformers.__version__,'gradio',gradio.__version__)"
echo "== build $(date +%T)"
[ -f /tmp/zmodel/zimage_fullsize.json ] || python3 -m zimage bench build --model /tmp/zmodel > /tmp/zb/build.log 2>&1
echo "== rows (a) single on GPU 0 | (d) balanced on GPU 1 $(date +%T)"
$B row --settings '{"device": "cuda:0"}' --out /tmp/zb/a_single.json > /tmp/zb/a_single.log 2>&1 &
( $B row --settings '{"device": "cuda:1", "memory_mode": "balanced"}' --cap-gib 16 --decode-peak --runs 3 --out /tmp/zb/d_balanced.json
  CUDNN_CONV_WSCAP_DBG=65536 $B row --settings '{"device": "cuda:1", "memory_mode": "balanced"}' --cap-gib 16 --decode-peak --runs 3 --out /tmp/zb/d_balanced_wsfree.json ) > /tmp/zb/d_balanced.log 2>&1 &
wait
echo "== (b) split $(date +%T)"
$B row --settings '{"memory_mode": "multi-gpu"}' --decode-peak --out /tmp/zb/b_split.json > /tmp/zb/b_split.log 2>&1
echo "== (c) server, one GPU $(date +%T)"
$B serve --flags "--gpus 0" --port 7861 --log /tmp/zb/c_serve1.log --out /tmp/zb/c_serve1.json > /tmp/zb/c_serve1.out 2>&1
echo "== (c) server, replicas auto $(date +%T)"
$B serve --flags "" --port 7862 --log /tmp/zb/c_serve2.log --out /tmp/zb/c_serve2.json > /tmp/zb/c_serve2.out 2>&1
echo "== done $(date +%T)"
touch /tmp/zb/done
