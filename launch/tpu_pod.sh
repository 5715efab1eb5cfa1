#!/usr/bin/env bash
# Cloud TPU VM pod slices: create, install, run a config on every worker, delete.
#
#   launch/tpu_pod.sh create                       # the slice ($TPU_NAME, $ZONE, $ACCELERATOR)
#   launch/tpu_pod.sh install                      # this repo + pinned deps + jax[tpu] on all workers
#   launch/tpu_pod.sh run configs/r50.py gs://BUCKET/run1 [--config.key=value ...]
#   launch/tpu_pod.sh logs                         # follow worker 0's log
#   launch/tpu_pod.sh delete
#
# Every worker runs the same command; jax.distributed.initialize() finds the pod by itself.
set -euo pipefail

TPU_NAME="${TPU_NAME:-vicregl}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-64}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REPO_URL="${REPO_URL:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo https://github.com/vicregl-jax/vicregl-jax.git)}"
BRANCH="${BRANCH:-main}"
JAX_VERSION="$(grep -E '^jax==' "$(dirname "$0")/../requirements.txt" | cut -d= -f3)"

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ${SPOT:+--spot}
    ;;
  install)
    ssh_all "set -e; rm -rf vicregl-jax; git clone --branch $BRANCH $REPO_URL vicregl-jax; \
      cd vicregl-jax; python3 -m pip install -q -r requirements.txt; \
      python3 -m pip install -q 'jax[tpu]==$JAX_VERSION'; \
      python3 -c 'import jax; print(jax.process_index(), jax.local_device_count())'"
    ;;
  run)
    config="${2:?usage: run CONFIG WORKDIR [flags]}"; workdir="${3:?usage: run CONFIG WORKDIR [flags]}"
    shift 3
    # nohup so that a dropped ssh session does not stop training; the log stays on each worker.
    ssh_all "cd vicregl-jax && nohup python3 main.py --config=$config --workdir=$workdir $* > run.log 2>&1 &"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=0 --command="tail -f vicregl-jax/run.log"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
  *)
    sed -n '2,12p' "$0"; exit 2
    ;;
esac
