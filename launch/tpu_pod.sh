#!/usr/bin/env bash
# Cloud TPU VM pod slices: create, install, run main.py on every worker, watch, stop, delete.
#
#   export TPU_NAME=vicregl ZONE=us-central2-b ACCELERATOR=v4-64   # SPOT=1 for spot capacity
#   launch/tpu_pod.sh create               # the slice, with the runtime of its generation; waits until ready
#   launch/tpu_pod.sh install              # every worker: this checkout's commit, a Python 3.11 venv (uv),
#                                          # jax[tpu] pinned, no torch
#   launch/tpu_pod.sh run CONFIG WORKDIR [flags ...]     # main.py on every worker; refused while one runs
#   launch/tpu_pod.sh status               # per worker: running / exited STATUS / stopped / idle, and its last log line
#   launch/tpu_pod.sh logs [N] [WORKDIR]   # follow worker N's log (default 0); with a WORKDIR, its copies there
#   launch/tpu_pod.sh stop                 # SIGTERM on every worker: they save a checkpoint at one step and exit
#   launch/tpu_pod.sh supervise CONFIG WORKDIR [flags ...]   # create + install + run, again after every
#                                          # preemption or crash, until the run ends (resumes from WORKDIR)
#   launch/tpu_pod.sh delete
#
#   DRY_RUN=1 launch/tpu_pod.sh ...        # print the gcloud commands instead of running them
#
# Environment: ZONE (required), TPU_NAME (vicregl), ACCELERATOR (v4-64), PROJECT (gcloud's default),
# RUNTIME (by generation), SPOT=1, QUEUED=1 (a queued resource; the default with SPOT=1),
# QUEUED_RESOURCE ($TPU_NAME-qr), ALLOW_DIRTY=1 (install ships uncommitted changes of tracked files),
# POLL_SECONDS (60), API_ERROR_LIMIT (30 failed describes in a row), UNREACHABLE_SECONDS (600),
# MAX_RESTARTS (3 crashed attempts), STOP_GRACE_SECONDS (300), ON_FAILURE (keep | delete the slice).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TPU_NAME="${TPU_NAME:-vicregl}"
ACCELERATOR="${ACCELERATOR:-v4-64}"
SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-$SPOT}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-$TPU_NAME-qr}"
POLL_SECONDS="${POLL_SECONDS:-60}"
API_ERROR_LIMIT="${API_ERROR_LIMIT:-30}"
UNREACHABLE_SECONDS="${UNREACHABLE_SECONDS:-600}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
STOP_GRACE_SECONDS="${STOP_GRACE_SECONDS:-300}"
ON_FAILURE="${ON_FAILURE:-keep}"
WORKER_SCRIPT="vicregl-jax/launch/tpu_worker.sh"  # relative to the remote home directory
SOURCE_ARCHIVE="vicregl-jax-src.tar.gz"          # what install copies to every worker's home
# vicregl_jax.distributed.REQUEUE_EXIT_CODE: saved a checkpoint after SIGTERM, start it again.
REQUEUE_EXIT_CODE=75

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}

say() { echo "tpu_pod.sh: $*" >&2; }

# The zones that offer each generation (cloud.google.com/tpu/docs/regions-zones).
zones_for() {
  case "$1" in
    v2-*) echo "us-central1-b us-central1-c europe-west4-a asia-east1-c" ;;
    v3-*) echo "us-central1-a us-central1-b europe-west4-a" ;;
    v4-*) echo "us-central2-b" ;;
    v5litepod-*|v5e-*) echo "us-central1-a us-south1-a us-west1-c us-west4-a europe-west4-b asia-southeast1-b" ;;
    v5p-*) echo "us-central1-a us-east5-a europe-west4-b" ;;
    v6e-*) echo "us-central1-b us-east1-d us-east5-a us-east5-b europe-west4-a asia-northeast1-b" ;;
    *) echo "(see cloud.google.com/tpu/docs/regions-zones)" ;;
  esac
}

command="${1:-}"
if [[ -z "${ZONE:-}" && -n "$command" && "$command" != help ]]; then
  die "ZONE is not set: ACCELERATOR=$ACCELERATOR is offered in $(zones_for "$ACCELERATOR"); export ZONE=one of them"
fi
ZONE="${ZONE:-}"
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

ssh_workers() {  # ssh_workers WORKER COMMAND
  gc compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" --worker="$1" --command="$2"
}

# Prints the slice's state: ACTIVE / READY when usable, SUSPENDED, PREEMPTED, ..., MISSING when
# the API says it does not exist, or API_ERROR (with the error on stderr) when describe itself
# failed: a hiccup of the API is not a missing slice.
slice_state() {
  local state error
  if dry_run; then
    echo READY
    return
  fi
  error="$(mktemp)"
  if [[ "$QUEUED" == 1 ]]; then
    state="$(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${location[@]}" \
      --format='value(state.state)' 2>"$error")" || state=FAILED_CALL
  else
    state="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${location[@]}" --format='value(state)' 2>"$error")" \
      || state=FAILED_CALL
  fi
  if [[ "$state" == FAILED_CALL ]]; then
    if grep -qE 'NOT_FOUND|was not found' "$error"; then
      state=MISSING
    else
      state=API_ERROR
      say "describe failed: $(tail -n 1 "$error")"
    fi
  fi
  rm -f "$error"
  echo "${state:-API_ERROR}"
}

request_slice() {  # the create call alone; returns its status
  local runtime="${RUNTIME:-}"
  if [[ -z "$runtime" ]]; then
    runtime="$(runtime_for "$ACCELERATOR")" || exit 1
  fi
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" "${location[@]}" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$runtime" "${spot[@]}"
  else
    gc compute tpus tpu-vm create "$TPU_NAME" "${location[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$runtime" "${spot[@]}"
  fi
}

# Waits until the slice is usable (returns 0) or lost on the way (returns 1, the state printed).
wait_ready() {
  local state errors=0
  while true; do
    state="$(slice_state)"
    case "$state" in
      ACTIVE|READY) say "$TPU_NAME ($ACCELERATOR) is ready"; return 0 ;;
      FAILED|SUSPENDING|SUSPENDED|PREEMPTED|TERMINATED|STOPPED|MISSING)
        say "$TPU_NAME is $state instead of starting"; return 1 ;;
      API_ERROR)
        errors=$((errors + 1))
        (( errors < API_ERROR_LIMIT )) || { say "describe failed $errors times in a row"; return 1; } ;;
      *) errors=0; say "$TPU_NAME is $state; waiting" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

create() {
  request_slice || die "create failed (above); \`$0 delete\` removes a half-made slice"
  dry_run && return
  # A queued resource waits for capacity (minutes to hours); a plain create returns when ready.
  wait_ready || die "$TPU_NAME was lost while starting: \`$0 delete\`, then create it again"
}

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources delete "$QUEUED_RESOURCE" "${location[@]}" --force --quiet
  else
    gc compute tpus tpu-vm delete "$TPU_NAME" "${location[@]}" --quiet
  fi
}

# Writes this checkout's commit (with ALLOW_DIRTY=1, its uncommitted changes to tracked files
# too) as a tar.gz to $1 and prints the commit; refuses a dirty tree otherwise.
pack_source() {
  local repo="$here/.." commit dirty
  commit="$(git -C "$repo" rev-parse HEAD)" || die "install ships this checkout's commit: $repo is not a git checkout"
  dirty="$(git -C "$repo" status --porcelain --untracked-files=no)"
  if [[ -n "$dirty" ]]; then
    [[ "${ALLOW_DIRTY:-0}" == 1 ]] || die "the checkout has uncommitted changes in $(cut -c4- <<<"$dirty" | head -n 3 | paste -sd ' '): commit them, or ALLOW_DIRTY=1 to ship them"
    commit="$(git -C "$repo" stash create)"  # a commit of the working tree; the tree is untouched
  fi
  git -C "$repo" archive --format=tar.gz -o "$1" "$commit"
  echo "$commit"
}

install() {
  local version script archive commit
  version="$(jax_version)" || exit 1
  archive="$(mktemp -d)/$SOURCE_ARCHIVE"
  commit="$(pack_source "$archive")" || exit 1
  # The single-quoted lines are expanded by the worker's shell, not here.
  # shellcheck disable=SC2016
  printf -v script '%s\n' \
    'set -euo pipefail' \
    'python3 -m pip install --user --quiet --upgrade uv || python3 -m pip install --user --quiet --upgrade --break-system-packages uv' \
    'export PATH="$HOME/.local/bin:$PATH"' \
    "rm -rf vicregl-jax vicregl-venv && mkdir vicregl-jax && tar -xzf $SOURCE_ARCHIVE -C vicregl-jax" \
    "echo $commit > vicregl-jax/COMMIT" \
    'uv venv --quiet --python 3.11 vicregl-venv' \
    "cd vicregl-jax && uv pip install --quiet --python ../vicregl-venv/bin/python -r requirements.txt 'jax[tpu]==$version'" \
    "../vicregl-venv/bin/python -c 'import importlib.util as u, sys, jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__, \"torch\", \"installed\" if u.find_spec(\"torch\") else \"absent\")'"
  say "installing commit $commit on every worker of $TPU_NAME"
  # A fresh slice may refuse ssh for a while (keys propagating, VMs booting): the script
  # starts from scratch, so trying again is safe.
  for attempt in 1 2 3; do
    if gc compute tpus tpu-vm scp "$archive" "$TPU_NAME:$SOURCE_ARCHIVE" "${location[@]}" --worker=all \
        && ssh_workers all "$script"; then
      rm -rf "$(dirname "$archive")"
      return 0
    fi
    say "install failed on a worker (attempt $attempt of 3)"
    sleep "$POLL_SECONDS"
  done
  rm -rf "$(dirname "$archive")"
  say "install failed 3 times: run \`$0 install\` again, or look at the messages above"
  return 1
}

# Prints one status line per worker (running / exited STATUS / idle); fails when a worker
# cannot be reached or does not answer.
worker_status() {
  local out
  if dry_run; then
    ssh_workers all "bash $WORKER_SCRIPT status"
    return
  fi
  out="$(ssh_workers all "if [ -f $WORKER_SCRIPT ]; then bash $WORKER_SCRIPT status; else echo 'worker ?: not installed'; fi" \
    2>/dev/null)" || return 1
  grep -E '^worker ' <<<"$out"
}

start() {  # start CONFIG WORKDIR [flags ...]: refused when any worker runs
  local status args
  if dry_run; then
    worker_status
  else
    status="$(worker_status)" || { say "cannot reach the workers of $TPU_NAME (is it up? \`$0 status\`)"; return 1; }
    if grep -q ': running' <<<"$status"; then
      die "$TPU_NAME is busy; \`$0 stop\` saves a checkpoint and stops it:
$(grep ': running' <<<"$status")"
    fi
  fi
  printf -v args ' %q' "$@"
  ssh_workers all "bash $WORKER_SCRIPT start$args" || return 1
  say "started on every worker of $TPU_NAME; \`$0 status\`, \`$0 logs N\`; each attempt's log: ${2%/}/logs/worker-N.attempt-A.log"
}

count() {  # count PATTERN TEXT: the lines of TEXT matching the extended regex PATTERN
  grep -Ec "$1" <<<"$2" || true
}

# SIGTERM to every worker, then SIGKILL to those still running after STOP_GRACE_SECONDS (a run
# whose peer died can hang in a collective and never reach its save).
stop_all() {
  local waited=0 status
  ssh_workers all "bash $WORKER_SCRIPT stop" >/dev/null 2>&1 || true
  while (( waited < STOP_GRACE_SECONDS )); do
    status="$(worker_status)" || return 0
    grep -q ': running' <<<"$status" || return 0
    sleep 1
    waited=$((waited + 1))
  done
  say "workers still running $STOP_GRACE_SECONDS s after SIGTERM: killing them"
  ssh_workers all "bash $WORKER_SCRIPT kill" >/dev/null 2>&1 || true
}

give_up() {  # give_up REASON: ends supervise with status 1, the slice deleted when ON_FAILURE=delete
  if [[ "$ON_FAILURE" == delete ]]; then
    delete >/dev/null 2>&1 || true
    die "$1 (slice deleted)"
  fi
  die "$1 (slice kept: \`$0 delete\` removes it)"
}

# Creates (or recreates) the slice, installs and runs, until every worker exits 0; see the
# README's table for what it does on each event.
supervise() {
  local state status workers running finished stopped requeued failed
  local phase=start lost=0 crashes=0 api_errors=0 unreachable_since=0 now
  if dry_run; then
    request_slice; install; start "$@"
    return
  fi
  while true; do
    state="$(slice_state)"
    case "$state" in
      ACTIVE|READY) api_errors=0 ;;
      API_ERROR)
        api_errors=$((api_errors + 1))
        (( api_errors < API_ERROR_LIMIT )) || give_up "describe failed $api_errors times in a row: the TPU API is down or this account lost access"
        sleep "$POLL_SECONDS"; continue ;;
      MISSING)
        api_errors=0
        say "$TPU_NAME does not exist: creating it"
        if request_slice; then
          phase=install
        else
          say "create failed (above); trying again"
        fi
        sleep "$POLL_SECONDS"; continue ;;
      SUSPENDING|SUSPENDED|PREEMPTED|FAILED|TERMINATED|STOPPED)
        api_errors=0
        lost=$((lost + 1))
        say "$TPU_NAME is $state: deleting it to create it again (lost $lost times)"
        delete || say "delete failed (above); trying again"
        phase=install; unreachable_since=0
        sleep "$POLL_SECONDS"; continue ;;
      *) api_errors=0; say "$TPU_NAME is $state; waiting"; sleep "$POLL_SECONDS"; continue ;;
    esac
    if [[ "$phase" == install ]]; then
      if install; then
        phase=start
      else
        say "install did not finish; checking the slice"
      fi
      sleep "$POLL_SECONDS"; continue
    fi
    if ! status="$(worker_status)"; then
      now="$(date +%s)"
      (( unreachable_since > 0 )) || unreachable_since="$now"
      if (( now - unreachable_since >= UNREACHABLE_SECONDS )); then
        lost=$((lost + 1))
        say "a worker of $TPU_NAME has not answered for $((now - unreachable_since)) s: deleting the slice to create it again (lost $lost times)"
        delete || say "delete failed (above); trying again"
        phase=install; unreachable_since=0
      else
        say "a worker of $TPU_NAME does not answer (for $((now - unreachable_since)) s of $UNREACHABLE_SECONDS); checking again"
      fi
      sleep "$POLL_SECONDS"; continue
    fi
    unreachable_since=0
    echo "$status"
    if grep -q ': not installed' <<<"$status"; then
      say "a worker of $TPU_NAME has no installation (a slice made by hand, or a replaced VM): installing"
      stop_all
      phase=install
      continue
    fi
    workers="$(count '^worker ' "$status")"
    running="$(count ': running' "$status")"
    finished="$(count ': exited 0:' "$status")"
    stopped="$(count ': stopped ' "$status")"
    requeued="$(count ": exited $REQUEUE_EXIT_CODE " "$status")"
    failed=$(( $(count ': exited ' "$status") - finished - requeued ))
    if (( workers > 0 && finished == workers )); then
      say "the run finished on all $workers workers (the slice was lost $lost times, the run crashed $crashes times)"
      return 0
    elif (( workers > 0 && stopped > 0 && finished + stopped == workers )); then
      say "the run was stopped by \`$0 stop\` (checkpoint saved); \`$0 supervise\` with the same arguments resumes it"
      return 0
    elif (( failed > 0 )); then
      crashes=$((crashes + 1))
      stop_all
      if (( crashes > MAX_RESTARTS )); then
        give_up "the run crashed $crashes times (MAX_RESTARTS=$MAX_RESTARTS), last on: $(grep -E ': exited ' <<<"$status" | grep -vE ": exited (0|$REQUEUE_EXIT_CODE)[: ]" | head -n 1)"
      fi
      say "the run crashed on a worker (crash $crashes of at most $MAX_RESTARTS restarts): starting it again"
      start "$@" || say "start failed; checking the slice"
    elif (( running == 0 )); then
      say "no worker runs (a new slice, or a checkpoint saved after SIGTERM): starting the run"
      start "$@" || say "start failed; checking the slice"
    fi
    sleep "$POLL_SECONDS"
  done
}

shift || true
case "$command" in
  create) create ;;
  install) install || exit 1 ;;
  run)
    [[ $# -ge 2 ]] || die "usage: $0 run CONFIG WORKDIR [main.py flags ...]"
    start "$@" || exit 1 ;;
  supervise)
    [[ $# -ge 2 ]] || die "usage: $0 supervise CONFIG WORKDIR [main.py flags ...]"
    supervise "$@" ;;
  status) worker_status ;;
  logs)
    worker="${1:-0}"
    if [[ -n "${2:-}" ]]; then
      if [[ "$2" == gs://* ]]; then
        gc storage cat "${2%/}/logs/worker-$worker.attempt-*.log"
      else
        cat "${2%/}"/logs/worker-"$worker".attempt-*.log
      fi
    else
      ssh_workers "$worker" "bash $WORKER_SCRIPT log"
    fi ;;
  stop) ssh_workers all "bash $WORKER_SCRIPT stop" ;;
  delete) delete ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
