#!/usr/bin/env bash
# The project's one GPU check-and-time script: everything a rare GPU session should run,
# in one call, in under ~9 minutes, each stage under a hard timeout, each stage run even
# when the one before failed. Results land in $OUT (or --out DIR):
#
#   gpu_check.json   stage statuses, environment facts, every stage's JSON embedded
#   summary.md       the tables for docs/benchmarks (sfm bench rows vs the HF baseline)
#   gpu_check.log    every stage's full output
#   bench_1p4b.json, bench_6p9b.json   sfm bench reports (docs/benchmarking.md)
#   bench_6p9b_fp8.json                 bf16 vs torchao float8 on the 6.9B shape (needs the
#                                       torchao wheel in .whl/ when the image lacks torchao)
#   hf_baseline.json                   benchmarks/bench_hf_baseline.py report
#   bench_kernels.json                 benchmarks/bench_kernels.py report (when it writes one)
#
# Stages, in this order: env, setup (wheels from .whl/ + this checkout into /tmp/site),
# bench_6p9b, bench_6p9b_fp8, bench_kernels, bench_1p4b, kernel_tests (pytest tests/kernels
# on the GPU), hf_baseline, then the summary (always).
#
# Usage (GPU, from the repository root; see docs/benchmarking.md):
#   bash benchmarks/gpu_check.sh                     # $OUT from the device tool
#   bash benchmarks/gpu_check.sh --skip-kernel-tests --budget 420
# CPU smoke run of the same plumbing (tiny shapes, TRITON_INTERPRET=1):
#   bash benchmarks/gpu_check.sh --smoke --out runs/gpu_check_smoke
#
# Options:
#   --smoke               CPU, tiny shapes, Triton interpreter, 1 timed step
#   --skip-kernel-tests   leave out pytest tests/kernels
#   --skip LIST           comma-separated stage names to leave out
#   --steps N --warmup W  timed / warm-up steps of the throughput stages (default 8 / 3)
#   --budget SECONDS      wall time for all stages before the summary (default 500; smoke 1200)
#   --out DIR             where results go (default $OUT, else runs/gpu_check[_smoke])
set -u
set -o pipefail

MODE=gpu
SKIP=","
STEPS=8
WARMUP=3
BUDGET=""
OUTDIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --skip-kernel-tests) SKIP="${SKIP}kernel_tests," ;;
    --skip) SKIP="${SKIP}$2,"; shift ;;
    --steps) STEPS="$2"; shift ;;
    --warmup) WARMUP="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --out) OUTDIR="$2"; shift ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
REPO="$PWD"
if [ "$MODE" = smoke ]; then
  : "${BUDGET:=1200}"
  OUTDIR="${OUTDIR:-runs/gpu_check_smoke}"
  STEPS=1
  WARMUP=1
  export TRITON_INTERPRET=1
  export CUDA_VISIBLE_DEVICES=""
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
  # tiny shapes on the real bench configs (fp32: the Triton interpreter's dtype)
  SHAPE="model.num_layers=2 model.hidden_size=64 model.num_attention_heads=2 model.seq_length=32 \
model.vocab_size=500 model.padded_vocab_size=512 model.precision=fp32 training.micro_batch_size=2 \
training.global_batch_size=2"
else
  : "${BUDGET:=500}"
  OUTDIR="${OUTDIR:-runs/gpu_check}"
  SHAPE=""
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
LOG="$OUTDIR/gpu_check.log"
STAGES="$WORK/stages.tsv"
: > "$LOG"
: > "$STAGES"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
START=$SECONDS
DEADLINE=$((START + BUDGET))
PY=python3
SFM=("$PY" -m megatron_sfm.cli)
PYTEST="$(dirname "$(command -v "$PY")")/pytest"
[ -x "$PYTEST" ] || PYTEST=pytest

say() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# run_stage NAME CAP_SECONDS COMMAND...: run under `timeout`, log, record status.
run_stage() {
  local name="$1" cap="$2"; shift 2
  case "$SKIP" in *",$name,"*)
    say "stage $name: skipped (asked)"
    printf '%s\tskipped\t-\t0\tasked\n' "$name" >> "$STAGES"; return 0 ;;
  esac
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 10 ]; then
    say "stage $name: skipped (time budget spent)"
    printf '%s\tskipped\t-\t0\ttime budget spent\n' "$name" >> "$STAGES"; return 0
  fi
  local limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  say "stage $name: start (limit ${limit}s): $*"
  echo "===== stage $name: $* =====" >> "$LOG"
  local t0=$SECONDS rc
  # bash -c so that the stage may be one of the functions below (exported)
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@" 2>&1 | tee "$WORK/$name.log" >> "$LOG"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0)) status=ok note=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; note="killed after ${limit}s";
  elif [ "$rc" -ne 0 ]; then status=failed; note="exit $rc"; fi
  note="${note:+$note; }$(grep -v '^[][{}(), "]*$' "$WORK/$name.log" | grep -v '^ENV_JSON' | grep -v -E '^(\[rank[0-9]+\]:)?[WI][0-9]{4} ' | tail -n 1 | tr '\t' ' ' | cut -c1-200)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dt" "$note" >> "$STAGES"
  say "stage $name: $status (rc $rc, ${dt}s)"
  return 0
}

env_facts() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)  kernel: $(uname -r)  cpus: $(nproc)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  $PY - <<'EOF'
import importlib, json, platform
facts = {"python": platform.python_version()}
for name in ("torch", "triton", "transformers", "megatron.core", "transformer_engine", "torchao", "psutil", "numpy"):
    try:
        module = importlib.import_module(name)
        facts[name] = getattr(module, "__version__", None) or getattr(getattr(module, "package_info", None), "__version__", "present")
    except Exception as exc:  # noqa: BLE001
        facts[name] = f"absent ({type(exc).__name__})"
import torch
facts["cuda_available"] = torch.cuda.is_available()
facts["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts.update(device=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                 memory_gib=round(p.total_memory / 2**30, 1))
print("ENV_JSON " + json.dumps(facts))
print(f"env: {facts.get('device', 'no GPU')}, torch {facts['torch']}, megatron-core {facts['megatron.core']}, "
      f"torchao {facts['torchao']}")
EOF
}

setup_gpu() {
  # Megatron-Core (and any other wheel carried in .whl/), then this checkout's
  # megatron_sfm/ package (kernels, data tools and evaluation live inside it).
  set -e
  mkdir -p /tmp/site
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    ls .whl
  else
    echo "no .whl/ folder: using the image's packages"
  fi
  rm -rf /tmp/site/megatron_sfm
  cp -r megatron_sfm /tmp/site/megatron_sfm
  PYTHONPATH=/tmp/site $PY -c "import megatron.core, megatron_sfm.kernels, megatron_sfm.model.builder; print('megatron-core', megatron.core.__version__ if hasattr(megatron.core, '__version__') else 'ok')"
}

bench_kernels() {
  local script=benchmarks/bench_kernels.py
  if [ ! -f "$script" ]; then echo "$script: not in this checkout"; return 3; fi
  local help args=()
  help="$($PY "$script" --help 2>&1 || true)"
  case "$help" in *--json*) args+=(--json "$OUTDIR/bench_kernels.json") ;; esac
  if [ "$MODE" = smoke ]; then
    case "$help" in *--smoke*) args+=(--smoke) ;; esac
  fi
  $PY "$script" "${args[@]}"
}

export -f env_facts setup_gpu bench_kernels
export PY MODE OUTDIR

# ----------------------------------------------------------------------------------------
say "mode $MODE, budget ${BUDGET}s, steps $STEPS (+$WARMUP warm-up), out $OUTDIR, work $WORK"
run_stage env 60 env_facts

if [ "$MODE" = gpu ]; then
  run_stage setup 90 setup_gpu
  export PYTHONPATH=/tmp/site
  export SFM_KERNEL_TESTS_ON_GPU=1
else
  printf 'setup\tskipped\t-\t0\tsmoke: the installed package\n' >> "$STAGES"
fi

# Most wanted first (the issues' speed targets), so a cut budget drops the least:
# 6.9B-shape bf16 rows, FP8 rows, kernel timings, 1.4B rows, kernel tests, HF baseline.
# shellcheck disable=SC2086 # SHAPE is a list of key=value words
run_stage bench_6p9b 150 "${SFM[@]}" bench examples/configs/bench-pythia-6.9b-4l.yaml $SHAPE \
  --backends sdpa,triton,local --steps "$STEPS" --warmup "$WARMUP" --measure-peak --quiet \
  --json "$OUTDIR/bench_6p9b.json"

# FP8 through torchao float8 (no Transformer Engine on the lent image): bf16 and fp8 rows
# side by side; the smoke run emulates the float8 GEMMs.
FP8_SET="model.fp8.backend=torchao model.fp8.recipe=tensorwise"
[ "$MODE" = smoke ] && FP8_SET="$FP8_SET model.fp8.emulate=true model.precision=bf16"
# shellcheck disable=SC2086
run_stage bench_6p9b_fp8 150 "${SFM[@]}" bench examples/configs/bench-pythia-6.9b-4l.yaml $SHAPE $FP8_SET \
  --backends sdpa --sweep model.fp8.format=none,hybrid --steps "$STEPS" --warmup "$WARMUP" --quiet \
  --json "$OUTDIR/bench_6p9b_fp8.json"

run_stage bench_kernels 120 bench_kernels

# shellcheck disable=SC2086
run_stage bench_1p4b 180 "${SFM[@]}" bench examples/configs/bench-pythia-1.4b.yaml $SHAPE \
  --backends sdpa,triton,local --steps "$STEPS" --warmup "$WARMUP" --measure-peak --quiet \
  --json "$OUTDIR/bench_1p4b.json"
run_stage kernel_tests 150 "$PYTEST" tests/kernels -q -p no:cacheprovider

HF_SET=()
for kv in $SHAPE; do HF_SET+=(--set "$kv"); done
run_stage hf_baseline 150 $PY benchmarks/bench_hf_baseline.py examples/configs/bench-pythia-1.4b.yaml \
  examples/configs/bench-pythia-6.9b-4l.yaml --modes amp,bf16 --steps "$STEPS" --warmup "$WARMUP" \
  "${HF_SET[@]}" --json "$OUTDIR/hf_baseline.json"

say "summary"
timeout 60 $PY benchmarks/gpu_summary.py --stages "$STAGES" --work "$WORK" --out "$OUTDIR" --mode "$MODE" \
  2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "done in $((SECONDS - START))s; results in $OUTDIR"
rm -rf "$WORK"
exit "$rc"
