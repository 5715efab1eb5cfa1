#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh, run over `gcloud ... ssh --worker=all` on every TPU VM
# of a slice (not meant to be called by hand):
#
#   tpu_worker.sh start CONFIG WORKDIR [flags ...]   start main.py detached; refused while one runs
#   tpu_worker.sh status                             one line: running / exited STATUS / stopped / idle
#   tpu_worker.sh stop                               SIGTERM to main.py: it saves a checkpoint, exits 75
#   tpu_worker.sh kill                               SIGKILL to the run (a run that ignored stop)
#   tpu_worker.sh log                                follow this worker's log of the current attempt
#
# Every start is a new attempt A with its own log, RUN_DIR/worker-K.attempt-A.log, never
# truncated; A is one more than the highest attempt of this worker found locally or in
# WORKDIR/logs. The log is copied to WORKDIR/logs/ every LOG_SYNC_SECONDS, at the end, and at
# once on SIGTERM (a preempted VM gets SIGTERM before it goes), so it outlives the VM.
# Environment: RUN_DIR (~/vicregl-run), PYTHON (~/vicregl-venv/bin/python), LOG_SYNC_SECONDS
# (60), TPU_WORKER_ID (default: the VM's metadata attribute agent-worker-number).
set -euo pipefail

# vicregl_jax.distributed.REQUEUE_EXIT_CODE: saved a checkpoint after SIGTERM, start it again.
REQUEUE_EXIT_CODE=75
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
run_dir="${RUN_DIR:-$HOME/vicregl-run}"
python="${PYTHON:-$HOME/vicregl-venv/bin/python}"
metadata="http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes"

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

# Prints the attempt numbers of this worker's logs listed on stdin, one per line.
attempt_numbers() {
  sed -nE "s/.*worker-$worker\.attempt-([0-9]+)\.log$/\1/p"
}

next_attempt() {  # next_attempt WORKDIR
  local highest
  highest="$(
    {
      ls "$run_dir" 2>/dev/null || true
      if [[ "$1" == gs://* ]]; then
        gcloud storage ls "${1%/}/logs/" 2>/dev/null || true
      else
        ls "${1%/}/logs" 2>/dev/null || true
      fi
    } | attempt_numbers | sort -n | tail -n 1
  )"
  echo $(( ${highest:-0} + 1 ))
}

upload_log() {  # upload_log WORKDIR LOG: a copy next to the run's checkpoints
  local name
  name="$(basename "$2")"
  if [[ "$1" == gs://* ]]; then
    gcloud storage cp --quiet "$2" "${1%/}/logs/$name" >/dev/null 2>&1 || true
  else
    mkdir -p "${1%/}/logs" && cp "$2" "${1%/}/logs/.$name.tmp" && mv "${1%/}/logs/.$name.tmp" "${1%/}/logs/$name" \
      || true
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
    attempt="$(next_attempt "$2")"
    log="$run_dir/worker-$worker.attempt-$attempt.log"
    echo "$log" >"$run_dir/current_log"
    # setsid + nohup: the run outlives the ssh session that started it.
    nohup setsid bash "${BASH_SOURCE[0]}" _run "$log" "$@" </dev/null >>"$run_dir/wrapper.log" 2>&1 &
    echo "$!" >"$run_dir/pid"
    echo "worker $worker: started attempt $attempt; log $log"
    ;;
  _run)
    shift
    log="$1"
    config="$2"
    workdir="$3"
    shift 3
    cd "$repo"
    echo "=== worker $worker: $(date -u +%FT%TZ) $(cat COMMIT 2>/dev/null || echo) main.py --config=$config --workdir=$workdir $*" >>"$log"
    "$python" main.py --config="$config" --workdir="$workdir" "$@" >>"$log" 2>&1 &
    child=$!
    echo "$child" >"$run_dir/python.pid"
    # A preempted VM sends SIGTERM to every process: pass it on to main.py (which saves), copy
    # the log at once (the VM may go before the save ends), and keep waiting for main.py.
    on_term() {
      kill -TERM "$child" 2>/dev/null || true
      upload_log "$workdir" "$log"
    }
    trap on_term TERM
    (
      trap - TERM
      while kill -0 "$child" 2>/dev/null; do
        sleep "${LOG_SYNC_SECONDS:-60}"
        upload_log "$workdir" "$log"
      done
    ) &
    syncer=$!
    status=0
    while true; do
      wait "$child" && status=0 || status=$?
      kill -0 "$child" 2>/dev/null || break  # wait returned for a trapped signal: main.py still runs
    done
    kill "$syncer" 2>/dev/null || true
    echo "=== worker $worker: $(date -u +%FT%TZ) main.py exited with status $status" >>"$log"
    echo "$status" >"$run_dir/exit_status"
    upload_log "$workdir" "$log"
    ;;
  status)
    last=""
    if [[ -f "$run_dir/current_log" && -f "$(<"$run_dir/current_log")" ]]; then
      last="$(grep -v '^=== worker' "$(<"$run_dir/current_log")" | tail -n 1 | tr -d '\r' | cut -c1-200)"
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
    elif pid="$(cat "$run_dir/pid" 2>/dev/null)"; then
      echo "worker $worker: exited 137: the run (pid $pid) was killed before it recorded a status"
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
  kill)
    if pid="$(running_pid)"; then
      rm -f "$run_dir/stop_requested"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      echo "worker $worker: killed the run (pid $pid)"
    else
      echo "worker $worker: nothing runs"
    fi
    ;;
  log)
    exec tail -n 200 -F "$(cat "$run_dir/current_log" 2>/dev/null || echo "$run_dir/none.log")"
    ;;
  *)
    sed -n '2,17p' "${BASH_SOURCE[0]}"
    exit 2
    ;;
esac
