"""The fake TPU slice of the launch tests (a pod in a box): gcloud is tests/fake_gcloud.py, each
worker a home folder, its runs local process groups and its metadata server a loopback one
(tests/fake_metadata.py); what the tests of tpu_pod.sh share."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
from fake_metadata import MetadataServers
from launch_helpers import ROOT

from vicregl_jax import distributed

TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")


def launch_env(**extra) -> dict:
    """Returns the environment for the launch scripts: no launcher variables of this shell, a
    zone, extra on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "TPU_"))}
    # ALLOW_DIRTY: install ships this checkout's working tree, committed or not (a test run
    # during development); the refusal of a dirty tree is tested on a checkout of its own.
    env.update({"ZONE": "us-central2-b", "ALLOW_DIRTY": "1", **{k: str(v) for k, v in extra.items()}})
    return env


def run_script(*args, env, check=True):
    """Returns the CompletedProcess of `bash *args` (asserting status 0 when check)."""
    run = subprocess.run(["bash", *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def write_executable(path, text):
    """Writes an executable file and returns its path as a string."""
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@contextlib.contextmanager
def pod_in_a_box(tmp_path, python, workers: int = 2):
    """Yields (env, gcloud state folder) of a TPU slice of `workers` VMs on this machine behind
    tests/fake_gcloud.py, whose venv python is `python`, each VM with its metadata server;
    on exit, the servers stop and every run left on the VMs is killed."""
    state = tmp_path / "gcloud"
    state.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "gcloud", f'#!/bin/sh\nexec {sys.executable} {ROOT}/tests/fake_gcloud.py "$@"\n')
    metadata = MetadataServers(state, workers)
    env = launch_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_GCLOUD_DIR=state,
        FAKE_WORKERS=workers,
        FAKE_METADATA_PORTS=",".join(map(str, metadata.ports)),
        FAKE_PYTHON=python,
        POLL_SECONDS=0.2,
        LOG_SYNC_SECONDS=1,
        STOP_GRACE_SECONDS=5,
    )
    try:
        yield env, state
    finally:
        kill_worker_runs(state)
        metadata.close()


def kill_worker_runs(state):
    """SIGKILL to whatever a test left running on the fake workers (their process groups)."""
    for pid_file in state.glob("worker-*/vicregl-run/pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture
def fake_slice(tmp_path):
    """A fake slice whose python records its arguments in WORKDIR/attempts-K.jsonl and follows
    FAKE_PLAN, one word per attempt: 'wait' (run until SIGTERM, then exit 75 as a run that
    saved a checkpoint), 'exit0', or 'crash0' (worker 0 exits 1, the others wait)."""
    python = write_executable(
        tmp_path / "fake_python",
        f"""#!{sys.executable}
import json, os, signal, sys, time, urllib.request
if sys.argv[1:2] == ["-c"]:  # install's check of the venv
    sys.exit(print("python 3.11 jax (fake) torch absent"))
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
os.makedirs(workdir, exist_ok=True)
worker = urllib.request.urlopen(urllib.request.Request(  # the VM's metadata server, as on a TPU VM
    "http://" + os.environ["GCE_METADATA_IP"] + "/computeMetadata/v1/instance/attributes/agent-worker-number",
    headers={{"Metadata-Flavor": "Google"}})).read().decode()
record = os.path.join(workdir, "attempts-" + worker + ".jsonl")
with open(record, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
attempt = len(open(record).read().splitlines())
plan = os.environ["FAKE_PLAN"].split(",")[attempt - 1]
print(f"attempt {{attempt}} on worker {{worker}}: {{plan}}", flush=True)
if plan == "exit0":
    sys.exit(0)
if plan == "crash0" and worker == "0":
    time.sleep(0.5)
    sys.exit("Traceback: worker 0 crashed")
def on_term(*_):
    print("SIGTERM: saving", flush=True)
    time.sleep(0.3)
    sys.exit({distributed.REQUEUE_EXIT_CODE})
signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(0.05)
""",
    )
    with pod_in_a_box(tmp_path, python) as (env, state):
        yield env, state, tmp_path / "run dir"


def attempts(workdir, worker):
    """Returns the argument lists the fake python of worker got, one per attempt."""
    path = workdir / f"attempts-{worker}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
