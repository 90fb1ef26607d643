#!/usr/bin/env bash
# On a CUDA machine: every Triton kernel compiled (not interpreted) against its torch reference (paged attention
# included, and the engine's forward with it against HF's logits), micro-benchmarks (paged attention: the kernel
# against the gather + SDPA path), then a short throughput benchmark of cospec against Hugging Face.
# Usually under 6 minutes (the timeouts are caps). Usage: benchmarks/gpu_check.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=0
PY=${PYTHON:-python}
$PY -m cospec.cli info | tee "$OUT/info.txt"
status=0
timeout 300 $PY -m benchmarks.gpu_kernel_check --device cuda --out "$OUT" 2>&1 | tee "$OUT/kernel_check.txt" || status=1
timeout 180 $PY -m pytest -q benchmarks/micro -k "not paged_attention" --benchmark-only \
    --benchmark-json "$OUT/micro.json" 2>&1 | tail -40 | tee "$OUT/micro.txt" || status=1
timeout 120 $PY -m pytest -q benchmarks/micro -k paged_attention --benchmark-only \
    --benchmark-json "$OUT/paged_attention.json" 2>&1 | tail -20 | tee "$OUT/paged_attention.txt" || status=1
timeout 240 $PY -m cospec.cli bench --device cuda --workloads rewrite humaneval --num-prompts 2 --max-new-tokens 64 \
    --batch-sizes 1 4 --methods hf hf_prompt_lookup cospec cospec_prompt_lookup --out "$OUT/bench" 2>&1 \
    | grep -v "run/s" | tail -30 | tee "$OUT/bench.txt" || status=1
exit $status
