#!/usr/bin/env bash
# A virtual environment for GPU nodes (one every node of the cluster sees), with the JAX CUDA
# wheel the node's NVIDIA driver can run:
#
#   launch/gpu_venv.sh /shared/venvs/vicregl      # run it on a GPU node (srun --nodes=1 ... works)
#   DRY_RUN=1 launch/gpu_venv.sh DIR              # print the choice and the commands only
#
# JAX's CUDA 13 wheels need driver 580 or newer, its CUDA 12 wheels driver 525 or newer (JAX's
# installation guide); the wheels bring the CUDA libraries themselves, so only the driver counts.
# The newest wheel the driver supports is chosen and the reason printed. Environment: PYTHON
# (python3.11), CUDA=12|13 (skip the check), NVIDIA_SMI (nvidia-smi).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:?usage: launch/gpu_venv.sh VENV_DIR}"

die() {
  echo "gpu_venv.sh: $*" >&2
  exit 1
}

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Prints the CUDA major version (12 or 13) of the JAX wheel for this node's driver, and says why.
choose_cuda() {
  local version major
  if [[ -n "${CUDA:-}" ]]; then
    [[ "$CUDA" == 12 || "$CUDA" == 13 ]] || die "CUDA=$CUDA: JAX ships wheels for CUDA 12 and 13 only"
    echo "gpu_venv.sh: CUDA=$CUDA given: jax[cuda$CUDA] (the driver is not checked)" >&2
    echo "$CUDA"
    return
  fi
  # One line per GPU: read them all and keep the first (`| head -n 1` would end the pipe early,
  # and nvidia-smi, killed by SIGPIPE on its next line, would fail the pipeline).
  version="$("${NVIDIA_SMI:-nvidia-smi}" --query-gpu=driver_version --format=csv,noheader 2>/dev/null)" \
    || die "nvidia-smi failed: run this on a GPU node (or set CUDA=12 or 13)"
  version="${version%%$'\n'*}"
  major="${version%%.*}"
  [[ "$major" =~ ^[0-9]+$ ]] || die "cannot read the driver version from nvidia-smi ('$version'): set CUDA=12 or 13"
  if (( major >= 580 )); then
    echo "gpu_venv.sh: NVIDIA driver $version >= 580: jax[cuda13]" >&2
    echo 13
  elif (( major >= 525 )); then
    echo "gpu_venv.sh: NVIDIA driver $version < 580 (CUDA 13 needs 580+): jax[cuda12], which needs 525+" >&2
    echo 12
  else
    die "NVIDIA driver $version is older than 525, the oldest JAX's CUDA 12 wheels run on: update the driver"
  fi
}

cuda="$(choose_cuda)" || exit 1
jax_version="$(grep -E '^jax==' "$here/../requirements.txt" | cut -d= -f3)"
[[ -n "$jax_version" ]] || die "requirements.txt pins no jax==VERSION"
run "${PYTHON:-python3.11}" -m venv "$venv"
run "$venv/bin/python" -m pip install --quiet -r "$here/../requirements.txt" "jax[cuda$cuda]==$jax_version"
