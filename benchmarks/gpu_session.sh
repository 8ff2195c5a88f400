#!/usr/bin/env bash
# One prepared GPU session (about 9 minutes on an H100/H200): what the CPU cannot check, in
# the order of what we most need to know. Run from the repo root on the lent machine:
#     bash benchmarks/gpu_session.sh "$OUT"
# Everything appends to OUT/gpu_session.log as it goes (a run cut off still reports what
# finished); per-run results go to OUT/*.jsonl.
set -u
OUT=${1:-gpu_session_out}
BUDGET=${2:-540}  # seconds for the whole script
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
END=$((SECONDS + BUDGET))
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" 2>&1 | tee -a "$LOG"
run() {  # run LIMIT COMMAND...: at most LIMIT seconds, never past the budget
    local limit=$1; shift
    local left=$((END - SECONDS))
    ((left < limit)) && limit=$left
    ((limit < 20)) && { echo "== skipped (budget spent): $*" | tee -a "$LOG"; return; }
    echo "== [$(date +%T), ${limit}s] $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tail -40 | tee -a "$LOG"
}
# 1. The CUDA test suite (13 passed on an H100 on 2026-11-26).
run 120 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider
# 2. The GPT table again, now that the benchmark's loss no longer casts the logits to fp32
#    (results/gpu_h100.md: that cast cost the eager naive / careful / Lightning loops ~4 ms
#    of a ~53 ms update), alternating, two runs of each eager loop.
run 330 python3 benchmarks/gpu_peers.py --workloads gpt --repeats 2 --batch 16 --steps 50 \
    --warmup 15 --loops "hand-written naive,hand-written careful,traineval defaults,Lightning default,Lightning lean" \
    --json "$OUT/gpt_b16.jsonl"
# 3. The CNN at batch 512 against the peers (last measured on the H200 before many changes).
run 200 python3 benchmarks/gpu_peers.py --workloads cnn --repeats 2 \
    --loops "hand-written naive,hand-written careful,traineval defaults,Lightning default" \
    --json "$OUT/cnn.jsonl"
echo "== done at $(date +%T)" | tee -a "$LOG"
