"""A stand-in for the gcloud CLI in the launch tests: a Cloud TPU slice of FAKE_WORKERS workers
on this machine, each worker a home directory under FAKE_GCLOUD_DIR and its runs local process
groups (a pod in a box).

    FAKE_GCLOUD_DIR/state           the slice's state (ACTIVE, SUSPENDED, PREEMPTED, ...; MISSING when absent)
    FAKE_GCLOUD_DIR/calls.jsonl     every call's arguments, one JSON list per line
    FAKE_GCLOUD_DIR/scenario.json   what goes wrong, read at every call (see below)
    FAKE_GCLOUD_DIR/accelerator     the accelerator type `create` was given (the metadata's accelerator-type)
    FAKE_GCLOUD_DIR/worker-K/       worker K's home: `ssh --command` runs there with bash, as the
                                    remote login shell would

Worker K is a TPU VM as JAX sees one (tests/fake_metadata.py): its metadata server is
127.0.0.1:FAKE_METADATA_PORTS[K] (GCE_METADATA_IP), which gives it its worker number, the
slice's workers and accelerator type; with FAKE_TPU_PCI (a folder of fake TPU chips) its
commands run in a mount namespace whose PCI bus shows them. No JAX_* variable tells a worker
who it is; only JAX_COORDINATOR_PORT moves the coordinator off JAX's fixed port 8482 to a fresh
one per started run (tests beside each other on one machine).

`scp` copies into every home; `ssh` runs the command for real (install too: `uv` and
`python3 -m pip` are stand-ins that make the venv's python FAKE_PYTHON instead of downloading).
`delete` kills every worker's processes (the VMs go away); `create` gives fresh homes.

scenario.json keys (all optional):
    describe_errors: N       the next N describe calls fail with an API error (not NOT_FOUND)
    unreachable: K           ssh to worker K fails until the slice is deleted
    preempt_during: PHASE    the first "create", "install" or "start" is hit by a preemption
    preempt_state: STATE     the state a preemption leaves (PREEMPTED; SUSPENDED for queued resources)

`gcloud compute tpus tpu-vm fake-preempt` preempts the slice now (the tests' hook).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from fake_metadata import vm_command
from helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
state_dir = os.environ["FAKE_GCLOUD_DIR"]
workers = int(os.environ.get("FAKE_WORKERS", "2"))
GRACE_S = float(os.environ.get("FAKE_PREEMPT_GRACE_S", "30"))
args = sys.argv[1:]
with open(os.path.join(state_dir, "calls.jsonl"), "a") as log:
    log.write(json.dumps(args) + "\n")


def path(name):
    return os.path.join(state_dir, name)


def state(value=None):
    if value is not None:
        with open(path("state"), "w") as f:
            f.write(value)
    return open(path("state")).read().strip() if os.path.exists(path("state")) else "MISSING"


def scenario():
    return json.load(open(path("scenario.json"))) if os.path.exists(path("scenario.json")) else {}


def update_scenario(**changes):
    data = {**scenario(), **changes}
    with open(path("scenario.json"), "w") as f:
        json.dump(data, f)


def option(name):
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)


def home(k):
    return os.path.join(state_dir, f"worker-{k}")


def worker_groups():
    """Returns the process group ids of every worker's runs (the wrappers start with setsid)."""
    groups = []
    for k in range(workers):
        pid_file = os.path.join(home(k), "vicregl-run", "pid")
        if os.path.exists(pid_file):
            try:
                groups.append(int(open(pid_file).read()))
            except ValueError:
                pass
    return groups


def signal_groups(groups, signum):
    for group in groups:
        try:
            os.killpg(group, signum)
        except (ProcessLookupError, PermissionError):
            pass


def alive(groups):
    alive_groups = []
    for group in groups:
        try:
            os.killpg(group, 0)
            alive_groups.append(group)
        except (ProcessLookupError, PermissionError):
            pass
    return alive_groups


def preempt():
    """What a spot preemption does: SIGTERM to every process of every VM, SIGKILL after the
    grace period, then the slice is gone."""
    groups = worker_groups()
    signal_groups(groups, signal.SIGTERM)
    end = time.time() + GRACE_S
    while alive(groups) and time.time() < end:
        time.sleep(0.1)
    signal_groups(groups, signal.SIGKILL)
    state(scenario().get("preempt_state", "PREEMPTED"))


def preempt_now(phase):
    """Returns True (after preempting) when the scenario preempts the slice during phase."""
    if scenario().get("preempt_during") != phase:
        return False
    update_scenario(preempt_during=None)
    preempt()
    return True


def stand_ins():
    """A bin folder with `uv` and `python3` stand-ins for install: no download, the venv's
    python is FAKE_PYTHON."""
    bin_dir = path("bin")
    if not os.path.isdir(bin_dir):
        os.makedirs(bin_dir)
        with open(os.path.join(bin_dir, "uv"), "w") as f:
            f.write(
                '#!/bin/sh\nif [ "$1" = venv ]; then\n  for last; do :; done\n'
                f'  mkdir -p "$last/bin" && ln -sf {os.environ["FAKE_PYTHON"]} "$last/bin/python"\nfi\n'
            )
        with open(os.path.join(bin_dir, "python3"), "w") as f:
            f.write(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then exit 0; fi\nexec {sys.executable} "$@"\n')
        for name in ("uv", "python3"):
            os.chmod(os.path.join(bin_dir, name), 0o755)
    return bin_dir


if args[:2] != ["compute", "tpus"] or len(args) < 4:
    sys.exit(f"fake gcloud: unsupported call {args}")
verb = args[3]
if verb == "describe":
    errors = scenario().get("describe_errors", 0)
    if errors:
        update_scenario(describe_errors=errors - 1)
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) UNAVAILABLE: The service is currently unavailable.")
    if state() == "MISSING":
        sys.exit(f"ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource '{args[4]}' was not found")
    print(state())
elif verb == "create":
    if state() != "MISSING":
        sys.exit(f"ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS: Resource '{args[4]}' already exists")
    for k in range(workers):
        shutil.rmtree(home(k), ignore_errors=True)
        os.makedirs(home(k))
    update_scenario(unreachable=None)
    with open(path("accelerator"), "w") as f:
        f.write(option("accelerator-type") or "")
    state("ACTIVE")
    if preempt_now("create"):
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.create) the TPU was preempted while it was being created")
elif verb == "fake-preempt":  # the tests' hook: what Google does to a spot slice
    preempt()
elif verb == "delete":
    groups = worker_groups()
    signal_groups(groups, signal.SIGKILL)
    state("MISSING")
elif verb in ("ssh", "scp"):
    if state() not in ("ACTIVE", "READY"):
        sys.exit("ERROR: (gcloud) the TPU is not ready")
    which = option("worker")
    command = option("command") or ""
    install = verb == "scp" or "uv venv" in command
    if install and preempt_now("install"):
        sys.exit("ssh: connect to host 10.130.0.2 port 22: Connection refused")
    status = 0
    starts = " start " in f"{command} "
    coordinator_port = str(free_port())
    metadata_ports = os.environ["FAKE_METADATA_PORTS"].split(",")
    for k in range(workers) if which == "all" else [int(which)]:
        if scenario().get("unreachable") == k:
            sys.stderr.write(f"ssh: connect to host 10.130.0.{k + 2} port 22: Connection timed out\n")
            status = 255
            continue
        if verb == "scp":
            shutil.copy(args[4], os.path.join(home(k), args[5].split(":", 1)[1]))
            continue
        env = {**os.environ, "HOME": home(k), "GCE_METADATA_IP": f"127.0.0.1:{metadata_ports[k]}"}
        if starts:
            env["JAX_COORDINATOR_PORT"] = coordinator_port
        if install:
            env["PATH"] = stand_ins() + os.pathsep + env["PATH"]
        for name in ("PYTHON", "RUN_DIR", "TPU_WORKER_ID", "FAKE_METADATA_PORTS"):
            env.pop(name, None)
        pci = os.environ.get("FAKE_TPU_PCI")
        argv = vm_command(pci, command) if pci else ["bash", "-c", command]
        run = subprocess.run(argv, cwd=home(k), env=env, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(run.stdout)
        status = max(status, run.returncode)
    if starts and preempt_now("start"):
        sys.exit(255)
    sys.exit(status)
else:
    sys.exit(f"fake gcloud: unsupported verb {verb}")
