"""A stand-in for the gcloud CLI in the launch tests: a Cloud TPU slice of FAKE_WORKERS workers
on this machine, each worker a home directory under FAKE_GCLOUD_DIR.

    FAKE_GCLOUD_DIR/state         the slice's state (ACTIVE, SUSPENDED, ...; MISSING when absent)
    FAKE_GCLOUD_DIR/calls.jsonl   every call's arguments, one JSON list per line
    FAKE_GCLOUD_DIR/worker-K/     worker K's home: `ssh --command` runs there with bash, as the
                                  remote login shell would, with TPU_WORKER_ID=K

`install` (a command that makes the venv) links the home's vicregl-jax to this checkout and its
venv's python to FAKE_PYTHON instead of downloading anything; `create` gives fresh homes.
"""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
state_dir = os.environ["FAKE_GCLOUD_DIR"]
workers = int(os.environ.get("FAKE_WORKERS", "2"))
args = sys.argv[1:]
with open(os.path.join(state_dir, "calls.jsonl"), "a") as log:
    log.write(json.dumps(args) + "\n")


def state(value=None):
    path = os.path.join(state_dir, "state")
    if value is not None:
        with open(path, "w") as f:
            f.write(value)
    return open(path).read().strip() if os.path.exists(path) else "MISSING"


def option(name):
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)


def home(k):
    return os.path.join(state_dir, f"worker-{k}")


if args[:2] != ["compute", "tpus"] or len(args) < 4:
    sys.exit(f"fake gcloud: unsupported call {args}")
verb = args[3]
if verb == "describe":
    if state() == "MISSING":
        sys.exit("ERROR: (gcloud) NOT_FOUND")
    print(state())
elif verb == "create":
    for k in range(workers):
        shutil.rmtree(home(k), ignore_errors=True)
        os.makedirs(home(k))
    state("ACTIVE")
elif verb == "delete":
    state("MISSING")
elif verb == "ssh":
    if state() not in ("ACTIVE", "READY"):
        sys.exit("ERROR: (gcloud) the TPU is not ready")
    which = option("worker")
    command = option("command")
    status = 0
    for k in range(workers) if which == "all" else [int(which)]:
        if "uv venv" in command:  # install
            os.symlink(ROOT, os.path.join(home(k), "vicregl-jax"))
            os.makedirs(os.path.join(home(k), "vicregl-venv", "bin"))
            os.symlink(os.environ["FAKE_PYTHON"], os.path.join(home(k), "vicregl-venv", "bin", "python"))
            print(f"python 3.11 jax 0.10.2 torch absent (worker {k})")
            continue
        env = {**os.environ, "HOME": home(k), "TPU_WORKER_ID": str(k)}
        env.pop("PYTHON", None)
        env.pop("RUN_DIR", None)
        run = subprocess.run(["bash", "-c", command], cwd=home(k), env=env, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(run.stdout)
        status = max(status, run.returncode)
    sys.exit(status)
else:
    sys.exit(f"fake gcloud: unsupported verb {verb}")
