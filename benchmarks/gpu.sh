#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (the device tool); each part has its own time limit.
#
#   issue 4 (default): tests/test_gpu.py (Float8 on the card, a Ray Train run on one GPU with nccl,
#     its checkpoint and resume), bf16 against Float8 tokens/s and MFU at the largest config that
#     fits (benchmarks/train_step.py --device cuda), and experiments/train.py on the embedded default.
#   issue 2 (`benchmarks/gpu.sh peer`): the PEER layer against PEER-pytorch (and the Triton kernels:
#     tests/test_peer_triton.py, then the peerlab-triton variant), and the whole model's tokens/s
#     against its dense baseline.
#
#   speed (`benchmarks/gpu.sh speed`): the figures of the speed work, in one go. The Triton kernels'
#     tests on the card, then the PEER layer at N = 1024², 8 heads, k 16, dim 768, bf16, at 1k and 16k
#     tokens (peerlab, its Triton kernels, PEER-pytorch, and the share of the HBM floor), the training
#     step with and without compiled blocks, bf16 against Float8, at the guide's widths and at hidden
#     2048, the fused LM-head loss against liger-kernel's (benchmarks/lm_head_loss.py), and the tests
#     of compiled blocks and of trials sharing a GPU (tests/test_gpu.py). Needs .gpu/site.tar.xz and,
#     in .whl/, PEER-pytorch, einx, frozendict and liger-kernel (with --no-deps).
#
# The machine has torch but not Ray or torchao: they travel as .gpu/site.tar.xz, made here with
#   pip install --target .gpu/site --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
#     'ray[default,train,tune,data]==2.60.0' torchao==0.18.0
# less what the machine already has (numpy, pandas, pyarrow) and what a run never imports
# (ray/jars, rllib, serve, llm), then `tar cJf .gpu/site.tar.xz -C .gpu/site .` (53 MB).
# The `peer` part needs PEER-pytorch, einx and frozendict as wheels in .whl/ instead.
# Writes its logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
part=${1:-train}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if [ "$part" = peer ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD/platform:$PWD:/tmp/site"
  # The Triton PEER kernels on the card (float64 parity, compiled and autotuned) before they are timed.
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_peer_triton.py 2>&1 | tee "$OUT/tests_triton.txt"
  python3 benchmarks/peer_layer.py --device cuda --dtype bfloat16 --experts 1048576 --dim 768 \
    --rounds 7 --reps 5 --json "$OUT/peer_1m_bf16.json" 2>&1 | tee "$OUT/peer_1m_bf16.txt"
  python3 benchmarks/peer_layer.py --device cuda --dtype float32 --rounds 7 --reps 5 \
    --json "$OUT/peer_64k_fp32.json" 2>&1 | tee "$OUT/peer_64k_fp32.txt"
  python3 benchmarks/model_train.py --config configs/config.yaml --device cuda --amp bf16 \
    --set model_config.peer_start_layer=11 --batch 8 --seq 1024 --rounds 5 --steps 3 \
    --json "$OUT/model_train.json" 2>&1 | tee "$OUT/model_train.txt"
  exit
fi

if [ "$part" = speed ]; then
  mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/platform:$PWD" PATH="/tmp/site/bin:$PATH"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_peer_triton.py 2>&1 | tee "$OUT/tests_triton.txt"
  for tokens in "1 1024" "4 4096"; do
    set -- $tokens
    timeout 240 python3 benchmarks/peer_layer.py --device cuda --dtype bfloat16 --experts 1048576 --dim 768 \
      --batch "$1" --seq "$2" --rounds 5 --reps 3 --json "$OUT/peer_1m_bf16_$(($1 * $2)).json" \
      2>&1 | tee "$OUT/peer_1m_bf16_$(($1 * $2)).txt"
  done
  for compiled in "" "--compile"; do
    for width in "" "--set model_config.hidden_size=2048"; do
      timeout 300 python3 benchmarks/train_step.py --device cuda --config configs/config.yaml --rounds 3 --reps 2 \
        --opt-steps 0 $compiled $width 2>&1 | grep -v Warning | tee -a "$OUT/train_step_speed.txt"
    done
  done
  for tokens in 4096 16384; do  # the fused LM head + loss: peerlab's against liger-kernel's (a wheel in .whl/)
    timeout 120 python3 benchmarks/lm_head_loss.py --tokens $tokens 2>&1 | tee -a "$OUT/lm_head_loss.txt"
  done
  python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$OUT/tests_gpu.txt"
  exit
fi

mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site || exit 1
export PYTHONPATH="/tmp/site:$PWD/platform:$PWD" PATH="/tmp/site/bin:$PATH"
python3 -c "import torch, ray, torchao, transformers; print('torch', torch.__version__, 'ray', ray.__version__,
  'torchao', torchao.__version__, 'transformers', transformers.__version__)" 2>&1 | grep -v Warning | tee -a "$OUT/gpu.txt"

# A machine kept warm from an earlier command may still run that command's Ray processes: stop them.
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1

# 1. Float8 on the card; a Ray Train run on one GPU worker (nccl), checkpoint and resume; the CUDA model tests.
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt"
if [ "${PIPESTATUS[0]}" != 0 ]; then  # keep Ray's logs of the failed run (the tests' Ray session)
  tar czf "$OUT/ray_logs.tar.gz" -C /tmp/ray/session_latest logs 2>/dev/null
fi
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1

# 2. bf16 against Float8 at the largest config that fits (the guide's model, its PEER layers from the last).
timeout 210 python3 benchmarks/train_step.py --device cuda --config configs/config.yaml --rounds 3 --reps 2 \
  --json "$OUT/train_step_gpu.json" 2>&1 | grep -v Warning | tee "$OUT/train_step_gpu.txt"

# 3. The user's command on the embedded default, on the GPU: one worker, Float8 on by default.
timeout 150 python3 experiments/train.py --config configs/demo.yaml --set train_config.num_workers=1 \
  --set train_config.max_steps=60 --set train_config.output_dir=/tmp/gpu-runs --set eval_config.evals=[] \
  2>&1 | tee "$OUT/train_demo.txt" | grep -v "^(" | tail -25
cp /tmp/gpu-runs/*/run_info.json "$OUT/run_info.json" 2>/dev/null
cp /tmp/gpu-runs/*/metrics.jsonl "$OUT/metrics.jsonl" 2>/dev/null
echo done
