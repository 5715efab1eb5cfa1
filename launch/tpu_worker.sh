#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh, run over `gcloud ... ssh --worker=all` on every TPU VM
# of a slice (not meant to be called by hand):
#
#   tpu_worker.sh start CONFIG WORKDIR [flags ...]   start main.py detached; refused while one runs
#   tpu_worker.sh status                             one line: running / exited STATUS / stopped / idle
#   tpu_worker.sh stop                               SIGTERM to main.py: it saves a checkpoint, exits 75
#   tpu_worker.sh log                                follow this worker's log
#
# main.py's output goes to RUN_DIR/run.log, copied every LOG_SYNC_SECONDS (and at the end) to
# WORKDIR/logs/worker-K.log when WORKDIR is a bucket, so it outlives a preempted VM.
# Environment: RUN_DIR (~/vicregl-run), PYTHON (~/vicregl-venv/bin/python), LOG_SYNC_SECONDS
# (60), TPU_WORKER_ID (default: the VM's metadata attribute agent-worker-number).
set -euo pipefail

# vicregl_jax.distributed.REQUEUE_EXIT_CODE: saved a checkpoint after SIGTERM, start it again.
REQUEUE_EXIT_CODE=75
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
run_dir="${RUN_DIR:-$HOME/vicregl-run}"
python="${PYTHON:-$HOME/vicregl-venv/bin/python}"
metadata="http://metadata.google.internal/computeMetadata/v1/instance/attributes"

worker_id() {
  if [[ -n "${TPU_WORKER_ID:-}" ]]; then
    echo "$TPU_WORKER_ID"
  else
    curl -fsS -H "Metadata-Flavor: Google" "$metadata/agent-worker-number" 2>/dev/null || echo "?"
  fi
}

# Prints the pid of this worker's run when it is alive; fails otherwise.
running_pid() {
  local pid
  [[ -f "$run_dir/pid" ]] || return 1
  pid="$(<"$run_dir/pid")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

upload_log() {
  local workdir="$1" worker="$2"
  if [[ "$workdir" == gs://* ]]; then
    gcloud storage cp --quiet "$run_dir/run.log" "${workdir%/}/logs/worker-$worker.log" >/dev/null 2>&1 || true
  fi
}

worker="$(worker_id)"
case "${1:-}" in
  start)
    shift
    : "${2:?usage: tpu_worker.sh start CONFIG WORKDIR [flags ...]}"
    if pid="$(running_pid)"; then
      echo "worker $worker: BUSY: a run is going on (pid $pid, $(cat "$run_dir/command" 2>/dev/null || echo '?'))"
      exit 3
    fi
    mkdir -p "$run_dir"
    rm -f "$run_dir/exit_status" "$run_dir/python.pid" "$run_dir/stop_requested"
    printf '%q ' "$@" >"$run_dir/command"
    # setsid + nohup: the run outlives the ssh session that started it.
    nohup setsid bash "${BASH_SOURCE[0]}" _run "$@" </dev/null >"$run_dir/wrapper.log" 2>&1 &
    echo "$!" >"$run_dir/pid"
    echo "worker $worker: started; log $run_dir/run.log"
    ;;
  _run)
    shift
    config="$1"
    workdir="$2"
    shift 2
    cd "$repo"
    "$python" main.py --config="$config" --workdir="$workdir" "$@" >"$run_dir/run.log" 2>&1 &
    child=$!
    echo "$child" >"$run_dir/python.pid"
    (
      while kill -0 "$child" 2>/dev/null; do
        sleep "${LOG_SYNC_SECONDS:-60}"
        upload_log "$workdir" "$worker"
      done
    ) &
    syncer=$!
    status=0
    wait "$child" || status=$?
    kill "$syncer" 2>/dev/null || true
    echo "$status" >"$run_dir/exit_status"
    upload_log "$workdir" "$worker"
    ;;
  status)
    last=""
    if [[ -f "$run_dir/run.log" ]]; then
      last="$(tail -n 1 "$run_dir/run.log" | tr -d '\r' | cut -c1-200)"
    fi
    if pid="$(running_pid)"; then
      echo "worker $worker: running (pid $pid): $last"
    elif [[ -f "$run_dir/exit_status" ]]; then
      status="$(<"$run_dir/exit_status")"
      if [[ "$status" == "$REQUEUE_EXIT_CODE" && -f "$run_dir/stop_requested" ]]; then
        echo "worker $worker: stopped (checkpoint saved) by tpu_pod.sh stop: $last"
      elif [[ "$status" == "$REQUEUE_EXIT_CODE" ]]; then
        echo "worker $worker: exited $status (checkpoint saved, asks for a restart): $last"
      else
        echo "worker $worker: exited $status: $last"
      fi
    else
      echo "worker $worker: idle"
    fi
    ;;
  stop)
    if [[ -f "$run_dir/python.pid" ]] && running_pid >/dev/null; then
      touch "$run_dir/stop_requested"  # so that tpu_pod.sh supervise does not restart it
      kill -TERM "$(<"$run_dir/python.pid")" 2>/dev/null || true
      echo "worker $worker: SIGTERM sent; main.py saves a checkpoint and exits"
    else
      echo "worker $worker: nothing runs"
    fi
    ;;
  log)
    exec tail -n 200 -F "$run_dir/run.log"
    ;;
  *)
    sed -n '2,13p' "${BASH_SOURCE[0]}"
    exit 2
    ;;
esac
