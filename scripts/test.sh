#!/usr/bin/env bash
# Install what the tests need, start the services they use (a one-host SLURM cluster),
# and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# CPU torch from the local wheel cache; a machine that already has torch keeps it
# (an unpinned torch would pull a multi-GB CUDA build).
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev,eval,fp8]"
if [ -x scripts/ci-services.sh ] || [ -f scripts/ci-services.sh ]; then
  eval "$(bash scripts/ci-services.sh start)"
fi
exec "$PY" -m pytest -p no:cacheprovider "$@"
