#!/usr/bin/env bash
# Install megatron-sfm (CPU torch when none is installed) and run the end-to-end demo on
# embedded data: filter -> tokenizer -> tokenize -> mix four conditions -> train four tiny
# models -> convert to Hugging Face -> propensity evaluation. Extra arguments go to
# `sfm demo` (e.g. --out DIR, --fast). A rerun skips finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m megatron_sfm.cli demo "$@"
