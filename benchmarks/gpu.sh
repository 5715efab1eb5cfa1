#!/usr/bin/env bash
# The accelerator benchmarks in one short run (bfloat16 compute, float32 parameters):
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# model_bench.py at batch 256 (JAX beside the PyTorch reference), train_bench.py for
# configs/r50.py and configs/convnext_s.py at batch 128 per device, and loss_bench.py.
# Each table also goes to OUT_DIR (default /tmp/vicregl_gpu_bench). Wheels in .whl/ (the
# project's pinned flax, optax, chex, orbax, ml_collections) are installed first when
# present, for machines whose image has other versions and no package index.
# A dry run on CPU: DTYPE=float32 MODEL_BATCH=2 TRAIN_BATCH=2 LOSS_BATCH=8 bash benchmarks/gpu.sh
set -u
OUT_DIR=${1:-${OUT:-/tmp/vicregl_gpu_bench}}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in model_bench.py: JAX takes half, not its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vicregl_site .whl/*.whl \
    && export PYTHONPATH=/tmp/vicregl_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SMOKE='import jax.numpy as jnp; from flax import nnx; from vicregl_jax import train; from vicregl_jax.models import create_backbone
print("smoke test:", nnx.jit(lambda m, x: m(x)[1])(create_backbone("resnet_test", rngs=nnx.Rngs(0)), jnp.ones((2, 64, 64, 3))).shape)'
if ! $PY -c "$SMOKE"; then
  echo "The pinned wheels do not run with this jax: trying the image's own flax, optax and orbax."
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vicregl_site_min .whl/ml_collections*.whl
  export PYTHONPATH=/tmp/vicregl_site_min:$PWD
  $PY -c "$SMOKE" || exit 1
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1 | tail -1
} 2>&1 | tee "$OUT_DIR/env.txt"

run() {  # run NAME SECONDS COMMAND...: a benchmark with its own time limit, its table kept
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt" | grep --line-buffered -v "^WARNING\|^I0000\|^W0000"
  echo "== $name exit ${PIPESTATUS[0]}"
}

run model_bench "${MODEL_LIMIT:-200}" $PY benchmarks/model_bench.py --dtype "${DTYPE:-bfloat16}" --batch "${MODEL_BATCH:-256}" --steps 10
run train_bench "${TRAIN_LIMIT:-260}" $PY benchmarks/train_bench.py --dtype "${DTYPE:-bfloat16}" --batch-per-device "${TRAIN_BATCH:-128}" --repeats 10
run loss_bench "${LOSS_LIMIT:-90}" $PY benchmarks/loss_bench.py --batch "${LOSS_BATCH:-64}" --repeats 20 --reference-repeats 10
