#!/usr/bin/env bash
# Cloud TPU VM pod slices: create, install, run main.py on every worker, watch, stop, delete.
#
#   export TPU_NAME=vicregl ZONE=us-central2-b ACCELERATOR=v4-64   # SPOT=1 for spot capacity
#   launch/tpu_pod.sh create               # the slice, with the runtime of its generation; waits until ready
#   launch/tpu_pod.sh install              # on every worker: Python 3.11 venv (uv), this repo, jax[tpu] pinned, no torch
#   launch/tpu_pod.sh run CONFIG WORKDIR [flags ...]     # main.py on every worker; refused while one runs
#   launch/tpu_pod.sh status               # per worker: running / exited STATUS / stopped / idle, and its last log line
#   launch/tpu_pod.sh logs [N] [WORKDIR]   # follow worker N's log (default 0); with a gs:// WORKDIR, its bucket copy
#   launch/tpu_pod.sh stop                 # SIGTERM on every worker: they save a checkpoint at one step and
#                                          # exit (supervise then ends instead of restarting)
#   launch/tpu_pod.sh supervise CONFIG WORKDIR [flags ...]   # create + install + run, and again after every
#                                          # preemption, until the run ends (resumes from WORKDIR each time)
#   launch/tpu_pod.sh delete
#
#   DRY_RUN=1 launch/tpu_pod.sh ...        # print the gcloud commands instead of running them
#
# Environment: TPU_NAME (vicregl), ZONE (us-central2-b), ACCELERATOR (v4-64), PROJECT (gcloud's
# default), RUNTIME (by generation: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p
# v2-alpha-tpuv5, v6e v2-alpha-tpuv6e), SPOT=1 (spot VMs), QUEUED=1 (a queued resource; the
# default with SPOT=1), QUEUED_RESOURCE ($TPU_NAME-qr), REPO_URL (this checkout's origin),
# REF (main: a branch, tag or commit), POLL_SECONDS (60, supervise).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TPU_NAME="${TPU_NAME:-vicregl}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-64}"
SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-$SPOT}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-$TPU_NAME-qr}"
REF="${REF:-main}"
POLL_SECONDS="${POLL_SECONDS:-60}"
WORKER_SCRIPT="vicregl-jax/launch/tpu_worker.sh"  # relative to the remote home directory
# vicregl_jax.distributed.REQUEUE_EXIT_CODE: saved a checkpoint after SIGTERM, start it again.
REQUEUE_EXIT_CODE=75

location=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  location+=(--project="$PROJECT")
fi
spot=()
if [[ "$SPOT" == 1 ]]; then
  spot=(--spot)
fi

dry_run() { [[ "${DRY_RUN:-0}" == 1 ]]; }

# Runs gcloud, or prints the command (shell-quoted, one line) under DRY_RUN=1.
gc() {
  if dry_run; then
    printf '%q ' gcloud "$@"
    printf '\n'
  else
    gcloud "$@"
  fi
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}

runtime_for() {
  case "$1" in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no known runtime for ACCELERATOR=$1: set RUNTIME (see cloud.google.com/tpu/docs/runtimes)" ;;
  esac
}

jax_version() {
  local version
  version="$(grep -E '^jax==' "$here/../requirements.txt" | cut -d= -f3)"
  [[ -n "$version" ]] || die "requirements.txt pins no jax==VERSION"
  echo "$version"
}

repo_url() {
  if [[ -n "${REPO_URL:-}" ]]; then
    echo "$REPO_URL"
  elif git -C "$here/.." remote get-url origin 2>/dev/null; then
    :
  else
    die "this checkout has no remote 'origin': set REPO_URL to a repository every worker can clone"
  fi
}

ssh_workers() {  # ssh_workers WORKER COMMAND
  gc compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" --worker="$1" --command="$2"
}

# Prints the slice's state: ACTIVE / READY when usable, SUSPENDED, PREEMPTED, ... or MISSING.
slice_state() {
  local state
  if dry_run; then
    echo READY
    return
  fi
  if [[ "$QUEUED" == 1 ]]; then
    state="$(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${location[@]}" \
      --format='value(state.state)' 2>/dev/null)" || state=MISSING
  else
    state="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${location[@]}" --format='value(state)' 2>/dev/null)" \
      || state=MISSING
  fi
  echo "${state:-MISSING}"
}

create() {
  local runtime="${RUNTIME:-}" state
  if [[ -z "$runtime" ]]; then
    runtime="$(runtime_for "$ACCELERATOR")"
  fi
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" "${location[@]}" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$runtime" "${spot[@]}"
  else
    gc compute tpus tpu-vm create "$TPU_NAME" "${location[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$runtime" "${spot[@]}"
  fi
  dry_run && return
  # A queued resource waits for capacity (minutes to hours); a plain create returns when ready.
  while true; do
    state="$(slice_state)"
    case "$state" in
      ACTIVE|READY) echo "tpu_pod.sh: $TPU_NAME ($ACCELERATOR, $runtime) is ready"; return ;;
      FAILED|SUSPENDED|PREEMPTED|TERMINATED) die "$TPU_NAME is $state instead of starting: see \`gcloud compute tpus queued-resources describe $QUEUED_RESOURCE ${location[*]}\`" ;;
      *) echo "tpu_pod.sh: $TPU_NAME is $state; waiting"; sleep "$POLL_SECONDS" ;;
    esac
  done
}

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources delete "$QUEUED_RESOURCE" "${location[@]}" --force --quiet
  else
    gc compute tpus tpu-vm delete "$TPU_NAME" "${location[@]}" --quiet
  fi
}

install() {
  local url version script
  url="$(repo_url)"
  version="$(jax_version)"
  # The single-quoted lines are expanded by the worker's shell, not here.
  # shellcheck disable=SC2016
  printf -v script '%s\n' \
    'set -euo pipefail' \
    'python3 -m pip install --user --quiet --upgrade uv || python3 -m pip install --user --quiet --upgrade --break-system-packages uv' \
    'export PATH="$HOME/.local/bin:$PATH"' \
    "rm -rf vicregl-jax vicregl-venv" \
    "git clone --quiet $(printf '%q' "$url") vicregl-jax" \
    "git -C vicregl-jax checkout --quiet $(printf '%q' "$REF")" \
    'uv venv --quiet --python 3.11 vicregl-venv' \
    "cd vicregl-jax && uv pip install --quiet --python ../vicregl-venv/bin/python -r requirements.txt 'jax[tpu]==$version'" \
    "../vicregl-venv/bin/python -c 'import importlib.util as u, sys, jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__, \"torch\", \"installed\" if u.find_spec(\"torch\") else \"absent\")'"
  # A fresh slice may refuse ssh for a while (keys propagating, VMs booting): the script
  # starts from scratch, so trying again is safe.
  for attempt in 1 2 3; do
    if ssh_workers all "$script"; then
      return 0
    fi
    echo "tpu_pod.sh: install failed on a worker (attempt $attempt of 3)" >&2
    sleep "$POLL_SECONDS"
  done
  die "install failed 3 times: run \`$0 install\` again, or look at the messages above"
}

# Prints one status line per worker (running / exited STATUS / idle); fails when a worker
# cannot be reached.
worker_status() {
  if dry_run; then
    ssh_workers all "bash $WORKER_SCRIPT status"
    return
  fi
  ssh_workers all "bash $WORKER_SCRIPT status" 2>/dev/null | grep -E '^worker '
}

start() {  # start CONFIG WORKDIR [flags ...]: refused when any worker runs
  local status args
  if dry_run; then
    worker_status
  else
    status="$(worker_status)" || die "cannot reach the workers of $TPU_NAME (is it up? \`$0 status\`)"
    if grep -q ': running' <<<"$status"; then
      die "$TPU_NAME is busy; \`$0 stop\` saves a checkpoint and stops it:
$(grep ': running' <<<"$status")"
    fi
  fi
  printf -v args ' %q' "$@"
  ssh_workers all "bash $WORKER_SCRIPT start$args"
  echo "tpu_pod.sh: started on every worker of $TPU_NAME; \`$0 status\`, \`$0 logs N\`" >&2
  if [[ "$2" == gs://* ]]; then
    echo "tpu_pod.sh: logs are copied to ${2%/}/logs/worker-N.log every minute" >&2
  fi
}

count() {  # count PATTERN TEXT: the lines of TEXT matching the extended regex PATTERN
  grep -Ec "$1" <<<"$2" || true
}

# Creates (or recreates) the slice, installs and runs, until every worker exits 0. Workers
# that exit 75 (checkpoint saved after SIGTERM) get the same command again; a lost slice (spot
# preemption, maintenance) is deleted and created anew, and the run resumes from WORKDIR.
supervise() {
  local state status workers running finished stopped requeued failed restarts=0
  if dry_run; then
    create; install; start "$@"
    return
  fi
  while true; do
    state="$(slice_state)"
    case "$state" in
      ACTIVE|READY) ;;
      MISSING) create; install; start "$@"; sleep "$POLL_SECONDS"; continue ;;
      SUSPENDING|SUSPENDED|PREEMPTED|FAILED|TERMINATED|STOPPED)
        echo "tpu_pod.sh: $TPU_NAME is $state: deleting it to create it again" >&2
        restarts=$((restarts + 1))
        delete; sleep "$POLL_SECONDS"; continue ;;
      *) echo "tpu_pod.sh: $TPU_NAME is $state; waiting" >&2; sleep "$POLL_SECONDS"; continue ;;
    esac
    if ! status="$(worker_status)"; then
      echo "tpu_pod.sh: the workers of $TPU_NAME do not answer; checking the slice" >&2
      sleep "$POLL_SECONDS"
      continue
    fi
    echo "$status"
    workers="$(count '^worker ' "$status")"
    running="$(count ': running' "$status")"
    finished="$(count ': exited 0:' "$status")"
    stopped="$(count ': stopped ' "$status")"
    requeued="$(count ": exited $REQUEUE_EXIT_CODE " "$status")"
    failed=$(( $(count ': exited ' "$status") - finished - requeued ))
    if (( workers > 0 && finished == workers )); then
      echo "tpu_pod.sh: the run finished on all $workers workers (the slice was lost $restarts times)" >&2
      return 0
    elif (( workers > 0 && stopped > 0 && finished + stopped == workers )); then
      echo "tpu_pod.sh: the run was stopped by \`$0 stop\` (checkpoint saved); \`$0 supervise\` with the same arguments resumes it" >&2
      return 0
    elif (( failed > 0 )); then
      echo "tpu_pod.sh: the run failed on a worker above; stopping the others. \`$0 logs N\` shows worker N" >&2
      ssh_workers all "bash $WORKER_SCRIPT stop" || true
      return 1
    elif (( running == 0 )); then
      echo "tpu_pod.sh: no worker runs (a new slice, or a checkpoint saved after SIGTERM): starting the run" >&2
      start "$@"
    fi
    sleep "$POLL_SECONDS"
  done
}

command="${1:-}"
shift || true
case "$command" in
  create) create ;;
  install) install ;;
  run)
    [[ $# -ge 2 ]] || die "usage: $0 run CONFIG WORKDIR [main.py flags ...]"
    start "$@" ;;
  supervise)
    [[ $# -ge 2 ]] || die "usage: $0 supervise CONFIG WORKDIR [main.py flags ...]"
    supervise "$@" ;;
  status) worker_status ;;
  logs)
    worker="${1:-0}"
    if [[ -n "${2:-}" ]]; then
      [[ "$2" == gs://* ]] || die "logs N WORKDIR reads the bucket copy of a gs:// workdir"
      gc storage cat "${2%/}/logs/worker-$worker.log"
    else
      ssh_workers "$worker" "bash $WORKER_SCRIPT log"
    fi ;;
  stop) ssh_workers all "bash $WORKER_SCRIPT stop" ;;
  delete) delete ;;
  *) sed -n '2,21p' "$0"; exit 2 ;;
esac
