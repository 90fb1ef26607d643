#!/usr/bin/env bash
# On a CUDA machine: every Triton kernel compiled (not interpreted) against its torch reference, then a short
# throughput benchmark of cospec against Hugging Face. Under 8 minutes. Usage: benchmarks/gpu_check.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=0
PY=${PYTHON:-python}
$PY -m cospec.cli info | tee "$OUT/info.txt"
status=0
timeout 240 $PY -m benchmarks.gpu_kernel_check --device cuda --out "$OUT" 2>&1 | tee "$OUT/kernel_check.txt" || status=1
timeout 240 $PY -m pytest -q benchmarks/micro --benchmark-only --benchmark-json "$OUT/micro.json" 2>&1 \
    | tail -40 | tee "$OUT/micro.txt" || status=1
timeout 300 $PY -m cospec.cli bench --device cuda --workloads rewrite humaneval --num-prompts 2 --max-new-tokens 64 \
    --batch-sizes 1 4 --methods hf hf_prompt_lookup cospec cospec_prompt_lookup --out "$OUT/bench" 2>&1 \
    | grep -v "run/s" | tail -30 | tee "$OUT/bench.txt" || status=1
exit $status
