#!/usr/bin/env bash
# The accelerator benchmarks in one device call of at most 10 minutes (bfloat16 compute,
# float32 parameters):
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
#   1. train_bench.py   the JAX pre-training step of configs/r50.py and configs/convnext.py:size=s
#                       at batch 128 (compile, step, images/s, peak memory, MFU), the backbone share
#                       of each, and a profile's time split (backbone per crop size, heads,
#                       criterion, optimiser). JAX has the GPU alone: 90% of its memory.
#   2. torch_step_bench.py   the release's PyTorch step (model, heads, criterion, optimiser,
#                       autocast float16, channels-last) at the same batch, in its own process.
#   3. model_bench.py   the backbones alone at batch 256 beside PyTorch: both in one process, so
#                       JAX takes half of the memory.
#   4. loss_bench.py    the criterion, in whatever time is left.
#   5. targets.py       the issue's targets against what the parts printed.
#
# Every part runs under its own time limit (and the whole under TOTAL_LIMIT seconds): a part cut
# short still leaves the rows it printed, in OUT_DIR/<part>.txt (default /tmp/vicregl_gpu_bench).
# Wheels in .whl/ (the project's pinned flax, optax, chex, orbax, ml_collections) are installed
# first when present, for machines whose image has other versions and no package index.
# A dry run on CPU (tiny batches; parts may hit their limits, which is what it checks):
#   DTYPE=float32 TRAIN_BATCH=2 TORCH_BATCH=2 MODEL_BATCH=2 LOSS_BATCH=8 REPEATS=1 bash benchmarks/gpu.sh
set -u
START=$SECONDS
TOTAL_LIMIT=${TOTAL_LIMIT:-560}
OUT_DIR=${1:-${OUT:-/tmp/vicregl_gpu_bench}}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DTYPE=${DTYPE:-bfloat16}
REPEATS=${REPEATS:-10}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vicregl_site .whl/*.whl \
    && export PYTHONPATH=/tmp/vicregl_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SMOKE='import jax.numpy as jnp; from flax import nnx; from vicregl_jax import train; from vicregl_jax.models import create_backbone
print("smoke test:", nnx.jit(lambda m, x: m(x)[1])(create_backbone("resnet_test", rngs=nnx.Rngs(0)), jnp.ones((2, 64, 64, 3))).shape)'
if ! XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 $PY -c "$SMOKE"; then
  echo "The pinned wheels do not run with this jax: trying the image's own flax, optax and orbax."
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vicregl_site_min .whl/ml_collections*.whl
  export PYTHONPATH=/tmp/vicregl_site_min:$PWD
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 $PY -c "$SMOKE" || exit 1
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1 | tail -1
} 2>&1 | tee "$OUT_DIR/env.txt"

run() {  # run NAME SECONDS COMMAND...: a part with its own time limit (cut to what TOTAL_LIMIT leaves)
  local name=$1 limit=$2
  shift 2
  local left=$((TOTAL_LIMIT - (SECONDS - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 10 ]; then
    echo "== $name: skipped, no time left" | tee "$OUT_DIR/$name.txt"
    return
  fi
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt" | grep --line-buffered -v "^WARNING\|^I0000\|^W0000"
  echo "== $name exit ${PIPESTATUS[0]} after $((SECONDS - START)) s"
}

# 1. JAX alone on the GPU: the train step gets 90% of the memory.
XLA_PYTHON_CLIENT_MEM_FRACTION=${STEP_MEM_FRACTION:-0.9} run train_bench "${TRAIN_LIMIT:-240}" \
  $PY benchmarks/train_bench.py --configs convnext_s,r50 --dtype "$DTYPE" --batch-per-device "${TRAIN_BATCH:-128}" --repeats "$REPEATS" \
  --profile "$OUT_DIR/trace" --profile-steps 3
# 2. PyTorch alone: its whole step, as the release trains.
run torch_step_bench "${TORCH_LIMIT:-110}" \
  $PY benchmarks/torch_step_bench.py --batch "${TORCH_BATCH:-${TRAIN_BATCH:-128}}" --repeats "$REPEATS"
# 3. JAX and PyTorch in one process: JAX takes half, not its default 75%.
XLA_PYTHON_CLIENT_MEM_FRACTION=${SHARED_MEM_FRACTION:-0.5} run model_bench "${MODEL_LIMIT:-130}" \
  $PY benchmarks/model_bench.py --dtype "$DTYPE" --batch "${MODEL_BATCH:-256}" --steps "$REPEATS" \
  --archs convnext_small resnet50
# 4. The criterion, in what is left.
XLA_PYTHON_CLIENT_MEM_FRACTION=${STEP_MEM_FRACTION:-0.9} run loss_bench "${LOSS_LIMIT:-80}" \
  $PY benchmarks/loss_bench.py --batch "${LOSS_BATCH:-64}" --repeats 20 --skip-reference
# 5. The targets.
$PY benchmarks/targets.py "$OUT_DIR" 2>&1 | tee "$OUT_DIR/targets.txt"
echo "== done after $((SECONDS - START)) s; tables in $OUT_DIR"
