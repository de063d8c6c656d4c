#!/usr/bin/env bash
# One GPU check on a machine with one NVIDIA GPU (H100/H200 class), under 8 minutes in all:
#   1. JAX with a GPU backend: the machine's own if it has one, else requirements-gpu.txt
#      (from PyPI, or from wheels someone put in .whl/; --fetch-wheels fetches only the pure-Python
#      ones, the CUDA wheels are gigabytes); project packages the machine lacks (ml_collections)
#      from .whl/ or PyPI;
#   2. the attention kernel numerics tests on the GPU (Pallas GPU kernel and cuDNN against the
#      xla reference, forward and gradients; Splash tests skip);
#   3. bench/step_time.py at a 1.5B-like shape (configs/1p5b.py at 8 x 2048 tokens, one GPU):
#      baseline vs Free Transformer with cuDNN, then the Free Transformer with xla, blocked and
#      pallas_gpu.
# Writes device_check.json (a summary), step_time_*.json and logs under $OUT (default
# /tmp/device_check). Each stage has its own time limit; a failed stage is recorded, not fatal.
#
#   bash bench/device_check.sh            # on the GPU machine
#   bash bench/device_check.sh --dry-run  # on a CPU: the same stages at a tiny shape
#   bash bench/device_check.sh --fetch-wheels  # on a networked machine: fill .whl/ for one without
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/device_check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
MODE="${1:-gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STATUS=()
SCALE=1  # time limits x SCALE (a dry run on a shared CPU compiles slowly)
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log, record the exit status
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  STATUS+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

if [[ "$MODE" == "--fetch-wheels" ]]; then  # pure-Python packages, for Python 3.12 machines
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
    ml_collections==1.1.0
  exit $?
fi

if [[ "$MODE" == "--dry-run" ]]; then
  export JAX_PLATFORMS=cpu
  SCALE=${DRY_RUN_SCALE:-6}
  TESTS=(tests/test_attention_kernels.py -k "auto or config_error or invalid or cudnn_wiring")
  SHAPE=(--config=configs/bench_cpu.py --config.model.n_layers=2 --config.model.d_model=128
         --config.model.ffn_dim=256 --config.data.seq_len=128 --config.model.attention_chunk=64
         --steps=1 --repeats=2)
  RUN1=(--variants=baseline,free --attention_impl=xla)
  RUN2=(--variants=free --attention_impl=chunked,blocked)
else
  export JAX_PLATFORMS=cuda
  # the harness keeps one worker per case alive (RUN2: 3 at once); the 1.5B Free Transformer at
  # 8 x 2048 tokens needs about 34 GB (args 18.6 + temporaries ~15, scaled from the v5p AOT table)
  export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
  if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    if [[ -d .whl ]]; then
      "$PY" -m pip install -q --no-index --find-links .whl --target /tmp/site -r requirements-gpu.txt
    else
      "$PY" -m pip install -q --target /tmp/site -r requirements-gpu.txt
    fi
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
  if ! "$PY" -c "import ml_collections" 2>/dev/null; then
    if [[ -d .whl ]]; then
      "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/ml_collections*.whl
    else
      "$PY" -m pip install -q --target /tmp/site ml_collections==1.1.0
    fi
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  TESTS=(tests/test_attention_kernels.py tests/test_fused.py)
  SHAPE=(--config=configs/1p5b.py --config.data.source=synthetic --config.data.tokenizer=byte
         --config.data.seq_len=2048 --config.data.packing=none --config.data.num_workers=0
         --config.train.batch_size=8 --config.mesh.fsdp=1 --steps=3 --repeats=5)
  RUN1=(--variants=baseline,free --attention_impl=cudnn)
  RUN2=(--variants=free --attention_impl=xla,blocked,pallas_gpu)
fi
"$PY" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"

stage kernel_tests 120 "$PY" -m pytest -q -o addopts= -p no:cacheprovider "${TESTS[@]}"
stage step_time_ft_vs_base 180 "$PY" bench/step_time.py "${SHAPE[@]}" "${RUN1[@]}" \
  --json="$OUT_DIR/step_time_ft_vs_base.json"
stage step_time_kernels 150 "$PY" bench/step_time.py "${SHAPE[@]}" "${RUN2[@]}" \
  --json="$OUT_DIR/step_time_kernels.json"

{
  echo "{\"date_utc\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\", \"mode\": \"$MODE\","
  echo " \"stages\": {$(IFS=,; echo "${STATUS[*]}")}}"
} > "$OUT_DIR/device_check.json"
cat "$OUT_DIR/device_check.json"
