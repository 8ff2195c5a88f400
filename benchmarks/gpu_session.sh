#!/usr/bin/env bash
# One prepared GPU session for issue #6 (about 9 minutes on an H100/H200): everything that
# the CPU could not measure, in the order of what we most need to know. Run from the repo
# root on the lent machine:  bash benchmarks/gpu_session.sh "$OUT"
# Each part appends to OUT/gpu_session.log; kernel tables go to OUT/profiles/.
set -u
OUT=${1:-gpu_session_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$LOG"
run() { echo "== $*" | tee -a "$LOG"; timeout 240 "$@" 2>&1 | tail -25 | tee -a "$LOG"; }
# 1. Does compiling the loss (since this session) lift compiled GPT MFU toward 0.40?
#    batch 16, against a careful loop compiled the same way; kernel tables of both.
run python3 benchmarks/gpu_peers.py --workloads gpt --repeats 1 --batch 16 --steps 50 \
    --warmup 15 --loops "traineval compile,careful + compile model and loss,careful + compile" \
    --json "$OUT/gpt_b16.jsonl"
run python3 benchmarks/gpu_peers.py --workloads gpt --repeats 1 --batch 16 --steps 25 \
    --warmup 15 --loops "traineval compile" --profile "$OUT/profiles"
# 2. max-autotune without CUDA graphs (compile takes longer; fewer steps).
run python3 benchmarks/gpu_peers.py --workloads gpt --repeats 1 --batch 16 --steps 40 \
    --warmup 15 --loops "traineval compile" --compile-mode max-autotune-no-cudagraphs \
    --json "$OUT/gpt_b16_autotune.jsonl"
# 3. The compiled CNN: max pooling against average pooling on the GPU.
run python3 benchmarks/bench_compile_pooling.py --device cuda --batch 512 --steps 20
