#!/usr/bin/env bash
# The GPU checks of issue 2, as one script for a lent GPU machine (the device tool):
#   GPU tests, the PEER layer benchmark at the CPU setting and at N = 1024^2 / dim 768 / bf16,
#   and the whole model's training tokens/s against its dense baseline.
# Needs PEER-pytorch, einx and frozendict as wheels in .whl/ (see BENCHMARKS.md); writes under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD/platform:$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt"

python3 benchmarks/peer_layer.py --device cuda --dtype bfloat16 --experts 1048576 --dim 768 \
  --rounds 7 --reps 5 --json "$OUT/peer_1m_bf16.json" 2>&1 | tee "$OUT/peer_1m_bf16.txt"
python3 benchmarks/peer_layer.py --device cuda --dtype float32 --rounds 7 --reps 5 \
  --json "$OUT/peer_64k_fp32.json" 2>&1 | tee "$OUT/peer_64k_fp32.txt"

python3 benchmarks/model_train.py --config configs/config.yaml --device cuda --amp bf16 \
  --set model_config.peer_start_layer=11 --batch 8 --seq 1024 --rounds 5 --steps 3 \
  --json "$OUT/model_train.json" 2>&1 | tee "$OUT/model_train.txt"
# PEER layer at the guide's sizes with 16x more tokens (less bound by kernel launches).
python3 benchmarks/peer_layer.py --device cuda --dtype bfloat16 --experts 1048576 --dim 768 --batch 8 --seq 2048 \
  --rounds 5 --reps 3 --json "$OUT/peer_1m_bf16_16k.json" 2>&1 | tee "$OUT/peer_1m_bf16_16k.txt"
