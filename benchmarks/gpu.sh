#!/usr/bin/env bash
# The GPU checks, as prepared scripts for a lent GPU machine (the device tool). Every part runs its
# steps in order of importance against one deadline (BUDGET seconds, its default below): a step gets
# its own time limit or what is left, whichever is less, and a step that would get under 30 s is
# skipped with a line saying so. Text goes to $OUT/log.txt, the figures' JSON to $OUT/json.tgz
# (refreshed after each step, so a killed command still returns what it measured): the device tool
# returns at most 8 files.
#
#   prepare (here, not on the device): the packages the machine lacks, into the ignored folders
#     .gpu/ (Ray 2.60 and torchao 0.18 for Python 3.12, less what the machine has and what a run
#     never imports: site.tar.xz, about 55 MB) and .whl/ (PEER-pytorch, einx, frozendict,
#     liger-kernel). Every device call below names both in `carry`.
#
#   speed (BUDGET 410) then speed2 (BUDGET 410), two calls back to back (the machine stays warm
#     30 s between them): the speed figures, each part's steps in order of importance (what a part's
#     budget leaves out is named in the log as skipped). With the machine's start and the transfers
#     (about 30 s and 9 s on an H200), about 860 s of a session's 900 s of device time.
#     speed:  the fused LM-head loss (peerlab's chunked loop, liger-kernel's, the plain one); the
#             Triton PEER kernels' tests on the card; the PEER layer at N = 1024², 8 heads, k 16,
#             dim 768, bf16, at 1k and 16k tokens (peerlab, its Triton kernels, PEER-pytorch, the
#             HBM-floor share); the training step of the guide's model (as many PEER layers as fit)
#             and its dense baseline, eager and with compiled blocks, bf16 and Float8, tokens/s and
#             MFU (benchmarks/train_step.py; its first Float8 variant of each compile mode also times
#             the layer shapes for Float8's filter, and prints those figures), and where each model's
#             eager bf16 step spends its time on the card (--profile: its 15 costliest ops).
#     speed2: the GPU tests of compiled blocks (inductor, and CUDA graphs) and of a trial's memory
#             share; the demo model's step with compile's CUDA graphs (reduce-overhead) against plain
#             compile and eager; the dense model at hidden 2048, compiled, bf16 against Float8; 8 demo
#             trials sharing the card at --gpus-per-trial 0.25 against one at a time
#             (benchmarks/gpu_share.py); the guide's PEER model with its experts in the Triton kernels.
#
#   arms (BUDGET 300): the feed-forward arms on the card (benchmarks/ffn_arms.py).
#   train (default, BUDGET 540): tests/test_gpu.py, bf16 against Float8 at the largest config that
#     fits, and experiments/train.py on the embedded default on the card.
#   peer (BUDGET 540): the PEER layer against PEER-pytorch, and the whole model against its dense
#     baseline.
#
# Example (device tool): run(command="bash benchmarks/gpu.sh speed", carry=[".gpu", ".whl"],
#   timeout_s=430), then at once run(command="bash benchmarks/gpu.sh speed2", ..., timeout_s=430).
# DRY=1 prints each step's command instead of running it (tests/test_benchmarks.py checks them).
set -uo pipefail
part=${1:-train}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [ "$part" = prepare ]; then
  set -e
  PIP=${PIP:-python3 -m pip}
  PLATFORMS="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"
  rm -rf .gpu .whl /tmp/peerlab-gpu-site
  mkdir -p .gpu .whl
  $PIP install -q --target /tmp/peerlab-gpu-site --python-version 3.12 --implementation cp --only-binary=:all: \
    $PLATFORMS 'ray[default,train,tune,data]==2.60.0' torchao==0.18.0
  # What the machine has (its image's numpy, pandas, pyarrow) and what a run never imports.
  (cd /tmp/peerlab-gpu-site && rm -rf numpy numpy.libs numpy-* pandas pandas-* pyarrow pyarrow-* \
    ray/jars ray/rllib ray/serve ray/llm && find . -name __pycache__ -prune -exec rm -rf {} +)
  tar cJf .gpu/site.tar.xz -C /tmp/peerlab-gpu-site .
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d .whl \
    PEER-pytorch==0.2.2 einx==0.4.3 frozendict==2.5.1 liger-kernel==0.8.5
  du -sh .gpu .whl
  exit
fi

OUT=${OUT:-/tmp/gpu-out}
DRY=${DRY:-}
case "$part" in speed) BUDGET=${BUDGET:-410} ;; speed2) BUDGET=${BUDGET:-410} ;; arms) BUDGET=${BUDGET:-300} ;; *) BUDGET=${BUDGET:-540} ;; esac
JSON=/tmp/gpu-json
mkdir -p "$OUT" "$JSON"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE=disabled

# step LIMIT COMMAND...: run COMMAND under `timeout`, within the part's deadline, its output into the log.
step() {
  local limit=$1 rest
  shift
  rest=$((BUDGET - SECONDS - 10))
  if [ -n "$DRY" ]; then
    printf '%q ' "$@"
    echo
    return 0
  fi
  if [ "$rest" -lt 30 ]; then
    echo "== skipped, out of time (${SECONDS} s of ${BUDGET} s): $*" | tee -a "$LOG"
    return 0
  fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  echo "== ${SECONDS} s: $* (limit ${limit} s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v -e Warning -e "^(.*pid=" | tee -a "$LOG"
  local code=${PIPESTATUS[0]}
  [ "$code" = 124 ] && echo "== timed out after ${limit} s" | tee -a "$LOG"
  tar czf "$OUT/json.tgz" -C "$JSON" . 2>/dev/null
  python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1  # a Ray cluster left behind breaks the next one
  return 0
}

if [ -z "$DRY" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
  mkdir -p /tmp/site
  if [ "$part" != peer ]; then
    tar xJf .gpu/site.tar.xz -C /tmp/site || exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$ROOT/platform:$ROOT" PATH="/tmp/site/bin:$PATH"
[ -z "$DRY" ] && python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" |
  tee -a "$LOG"
[ -z "$DRY" ] && python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1  # Ray processes of an earlier command on a warm machine
PYTEST="python3 -m pytest -q -p no:cacheprovider -rs"
PEER_1M="benchmarks/peer_layer.py --device cuda --dtype bfloat16 --experts 1048576 --dim 768 --rounds 5 --reps 3"
TRAIN_STEP="benchmarks/train_step.py --device cuda --opt-steps 0 --rounds 3 --reps 2"

if [ "$part" = speed ]; then
  step 40 python3 benchmarks/lm_head_loss.py --tokens 16384 --json $JSON/lm_head_loss.json
  # The kernels on the card against float64 (the interpreter's copy of these cases runs in CI: Triton
  # 3.6's interpreter fails on NumPy 2.4 and newer, which the machine has).
  step 50 $PYTEST tests/test_peer_triton.py -k on_cuda
  step 70 python3 $PEER_1M --batch 1 --seq 1024 --json $JSON/peer_1k.json
  step 80 python3 $PEER_1M --batch 4 --seq 4096 --json $JSON/peer_16k.json
  step 200 python3 $TRAIN_STEP --config configs/config.yaml --compile-modes none,default --profile 15 \
    --json $JSON/train_step.json
elif [ "$part" = speed2 ]; then
  step 60 $PYTEST tests/test_gpu.py -k "inductor or cuda_graphs or sharing"
  step 50 python3 $TRAIN_STEP --config configs/demo.yaml --compile-modes none,default,reduce-overhead \
    --precisions bf16 --json $JSON/train_step_demo_graphs.json
  step 80 python3 $TRAIN_STEP --config configs/config.yaml --compile --set model_config.use_peer=false \
    --set model_config.hidden_size=2048 --json $JSON/train_step_2048.json
  # Float8 off and bf16 on, the model the demo trains on a Float8 card (on an H200 Float8 converted none of
  # its layers, and its figures took 44 s of this step).
  step 200 python3 benchmarks/gpu_share.py --share 0.25 --steps 40 --out /tmp/bench-share --json $JSON/share.json \
    --set train_config.float8=false --set train_config.bf16=true
  # The guide's PEER model with its experts in the Triton kernels (PEERLAB_TRITON=1), eager and compiled.
  export PEERLAB_TRITON=1
  step 60 python3 $TRAIN_STEP --config configs/config.yaml --compile-modes none,default --precisions bf16 \
    --skip-dense --profile 15 --json $JSON/train_step_triton.json
  unset PEERLAB_TRITON
elif [ "$part" = arms ]; then
  step 280 python3 benchmarks/ffn_arms.py --config configs/config.yaml --device cuda \
    --set model_config.peer_start_layer=11 --steps 4 --rounds 2 --json $JSON/ffn_arms.json
elif [ "$part" = peer ]; then
  step 120 $PYTEST tests/test_peer_triton.py
  step 150 python3 $PEER_1M --rounds 7 --reps 5 --json $JSON/peer_1m_bf16.json
  step 90 python3 benchmarks/peer_layer.py --device cuda --dtype float32 --rounds 7 --reps 5 \
    --json $JSON/peer_64k_fp32.json
  step 150 python3 benchmarks/model_train.py --config configs/config.yaml --device cuda --amp bf16 \
    --set model_config.peer_start_layer=11 --batch 8 --seq 1024 --rounds 5 --steps 3 --json $JSON/model_train.json
else
  # Float8 on the card; a Ray Train run on one GPU worker (nccl), checkpoint and resume; the CUDA model tests.
  step 200 $PYTEST tests/test_gpu.py
  # bf16 against Float8 at the largest config that fits (the guide's model, its PEER layers from the last).
  step 210 python3 $TRAIN_STEP --config configs/config.yaml --json $JSON/train_step_gpu.json
  # The user's command on the embedded default, on the GPU: one worker, Float8 on by default.
  step 120 python3 experiments/train.py --config configs/demo.yaml --set train_config.num_workers=1 \
    --set train_config.max_steps=60 --set train_config.output_dir=/tmp/gpu-runs --set eval_config.evals=[]
  [ -z "$DRY" ] && cp /tmp/gpu-runs/*/run_info.json /tmp/gpu-runs/*/metrics.jsonl "$JSON/" 2>/dev/null &&
    tar czf "$OUT/json.tgz" -C "$JSON" .
fi
[ -z "$DRY" ] && echo "done in ${SECONDS} s" | tee -a "$LOG"
exit 0
