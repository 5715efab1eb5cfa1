"""tpu_pod.sh supervise on a pod in a box (tests/fake_gcloud.py: each worker a local process
group with its own metadata server) through a slice's bad days: the TPU API failing for a
while, a preemption while the slice is created, installed or started, a VM that stops
answering, a worker killed with SIGKILL, a run that crashes again and again, and a spot
preemption mid-run of the real training, which resumes on the new slice bit for bit where an
uninterrupted run ends.

The events are the fake gcloud's scenario (scenario.json); the runs are the fake python of
pod_box (cheap: what supervise does is the same) except in the last two tests, whose VMs are
TPU VMs to JAX (tests/fake_metadata.py): JAX's own cluster detection finds a 4-host slice (a
probe: initialisation and one collective), and main.py trains on 2 workers x 1 CPU device
through JAX's coordination service on 127.0.0.1."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import fake_metadata
import pytest
from helpers import xla_flags
from launch_helpers import ROOT, TOTAL_STEPS, assert_bitwise_equal, reference_run, tiny_run_flags, wait_until
from pod_box import TPU_POD, attempts, fake_slice, pod_in_a_box, run_script, write_executable  # noqa: F401

SUPERVISE_TIMEOUT_S = 120


def scenario(state, **events):
    (state / "scenario.json").write_text(json.dumps(events))


def verbs(state) -> list[str]:
    """Returns the gcloud calls made so far, as 'describe', 'create', 'delete', 'ssh', ..."""
    return [json.loads(line)[3] for line in (state / "calls.jsonl").read_text().splitlines()]


def supervise(env, workdir, timeout=SUPERVISE_TIMEOUT_S):
    """Runs tpu_pod.sh supervise to its end; returns (status, output)."""
    return finish(start_supervise(env, workdir), timeout)


def start_supervise(env, workdir, config="configs/r50.py", flags=()):
    return subprocess.Popen(
        ["bash", TPU_POD, "supervise", config, str(workdir), *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc, timeout=SUPERVISE_TIMEOUT_S):
    """Waits for supervise to end; returns (status, output). Kills it after timeout seconds."""
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
        pytest.fail(f"supervise did not end within {timeout} s:\n{output[-3000:]}")
    return proc.returncode, output


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def test_api_errors_are_retried_and_not_taken_for_a_missing_slice(fake_slice):
    env, state, workdir = fake_slice
    env["FAKE_PLAN"] = "exit0"
    run_script(TPU_POD, "create", env=env)
    run_script(TPU_POD, "install", env=env)
    scenario(state, describe_errors=4)
    status, output = supervise(env, workdir)
    assert status == 0, output
    assert output.count("describe failed: ERROR: (gcloud.compute.tpus.tpu-vm.describe) UNAVAILABLE") == 4
    assert verbs(state).count("create") == 1 and "delete" not in verbs(state)
    assert "the run finished on all 2 workers (the slice was lost 0 times, the run crashed 0 times)" in output

    scenario(state, describe_errors=100)
    env.update(API_ERROR_LIMIT="3")
    status, output = supervise(env, workdir)
    assert status == 1
    assert last_line(output) == (
        "tpu_pod.sh: describe failed 3 times in a row: the TPU API is down or this account "
        f"lost access (slice kept: `{TPU_POD} delete` removes it)"
    )


def test_a_slice_made_by_hand_without_install_is_installed_first(fake_slice):
    env, state, workdir = fake_slice
    env["FAKE_PLAN"] = "exit0"
    run_script(TPU_POD, "create", env=env)
    status, output = supervise(env, workdir)
    assert status == 0, output
    assert "worker ?: not installed" in output and "a worker of vicregl has no installation" in output
    assert "the run finished on all 2 workers (the slice was lost 0 times, the run crashed 0 times)" in output
    assert verbs(state).count("create") == 1 and verbs(state).count("scp") == 1


@pytest.mark.parametrize("phase", ["create", "install", "start"])
def test_a_preemption_while_creating_installing_or_starting_recreates_the_slice(fake_slice, phase):
    env, state, workdir = fake_slice
    env["FAKE_PLAN"] = "exit0,exit0"  # a run preempted as it starts may not have begun: attempt 1 or 2 ends it
    scenario(state, preempt_during=phase)
    status, output = supervise(env, workdir)
    assert status == 0, output
    assert "vicregl is PREEMPTED: deleting it to create it again (lost 1 times)" in output
    assert "the run finished on all 2 workers (the slice was lost 1 times, the run crashed 0 times)" in output
    assert verbs(state).count("create") == 2 and verbs(state).count("delete") == 1
    if phase != "start":
        assert len(attempts(workdir, 0)) == len(attempts(workdir, 1)) == 1


def test_an_unreachable_worker_is_timed_out_and_the_slice_recreated(fake_slice):
    env, state, workdir = fake_slice
    env.update(FAKE_PLAN="wait,exit0", UNREACHABLE_SECONDS="1")
    supervisor = start_supervise(env, workdir)
    wait_until(lambda: len(attempts(workdir, 1)) == 1, "the run runs")
    scenario(state, unreachable=1)  # worker 1's VM stops answering ssh; its run goes on
    status, output = finish(supervisor)
    assert status == 0, output
    assert "a worker of vicregl does not answer (for 0 s of 1); checking again" in output
    assert (
        "a worker of vicregl has not answered for 1 s: deleting the slice to create it again (lost 1 times)" in output
    )
    assert "the run finished on all 2 workers (the slice was lost 1 times, the run crashed 0 times)" in output
    assert verbs(state).count("create") == 2 and len(attempts(workdir, 0)) == 2


def test_a_worker_killed_with_sigkill_is_a_crash_and_the_run_starts_again(fake_slice):
    env, state, workdir = fake_slice
    env["FAKE_PLAN"] = "wait,exit0"
    supervisor = start_supervise(env, workdir)
    pid_file = state / "worker-1" / "vicregl-run" / "python.pid"
    wait_until(lambda: len(attempts(workdir, 1)) == 1 and pid_file.exists(), "the run runs")
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    status, output = finish(supervisor)
    assert status == 0, output
    assert "worker 1: exited 137: attempt 1 on worker 1: wait" in output
    assert "the run crashed on a worker (crash 1 of at most 3 restarts): starting it again" in output
    assert "the run finished on all 2 workers (the slice was lost 0 times, the run crashed 1 times)" in output
    # The surviving worker was stopped (SIGTERM: it saved) before the run started again.
    assert "SIGTERM: saving" in (workdir / "logs" / "worker-0.attempt-1.log").read_text()


@pytest.mark.parametrize("max_restarts", [1, 2])
def test_a_run_that_keeps_crashing_is_restarted_up_to_max_restarts_then_stopped(fake_slice, max_restarts):
    env, state, workdir = fake_slice
    env.update(FAKE_PLAN="crash0,crash0,exit0", MAX_RESTARTS=str(max_restarts), ON_FAILURE="delete")
    status, output = supervise(env, workdir)
    logs = workdir / "logs"
    for attempt in (1, 2):  # every attempt kept its own log, copied next to the checkpoints
        log = (logs / f"worker-0.attempt-{attempt}.log").read_text()
        assert f"attempt {attempt} on worker 0: crash0" in log and "Traceback: worker 0 crashed" in log
        assert "main.py exited with status 1" in log
        assert "SIGTERM: saving" in (logs / f"worker-1.attempt-{attempt}.log").read_text()
    if max_restarts == 1:
        assert status == 1
        assert last_line(output) == (
            "tpu_pod.sh: the run crashed 2 times (MAX_RESTARTS=1), last on: worker 0: "
            "exited 1: Traceback: worker 0 crashed (slice deleted)"
        )
        assert (state / "state").read_text() == "MISSING" and len(attempts(workdir, 0)) == 2
        shown = run_script(TPU_POD, "logs", "0", str(workdir), env=env).stdout  # every attempt, the slice gone
        assert "attempt 1 on worker 0: crash0" in shown and "attempt 2 on worker 0: crash0" in shown
    else:
        assert status == 0, output
        assert "the run finished on all 2 workers (the slice was lost 0 times, the run crashed 2 times)" in output
        assert "attempt 3 on worker 1: exit0" in (logs / "worker-1.attempt-3.log").read_text()


def test_a_preempted_worker_s_log_is_copied_at_sigterm(fake_slice):
    """LOG_SYNC_SECONDS far away and the VM gone 0.1 s after SIGTERM (before the run exits):
    the log reaches WORKDIR/logs anyway, copied by the SIGTERM trap."""
    env, state, workdir = fake_slice
    env.update(FAKE_PLAN="wait", LOG_SYNC_SECONDS="1000", FAKE_PREEMPT_GRACE_S="0.1")
    run_script(TPU_POD, "create", env=env)
    run_script(TPU_POD, "install", env=env)
    run_script(TPU_POD, "run", "configs/r50.py", str(workdir), env=env)
    local = state / "worker-0" / "vicregl-run" / "worker-0.attempt-1.log"
    wait_until(lambda: local.exists() and "attempt 1 on worker 0: wait" in local.read_text(), "the run logs")
    assert not (workdir / "logs").exists()
    subprocess.run(["gcloud", "compute", "tpus", "tpu-vm", "fake-preempt"], env=env, check=True, timeout=30)
    copied = workdir / "logs" / "worker-0.attempt-1.log"
    wait_until(copied.exists, "the log is copied", timeout=10)
    assert "attempt 1 on worker 0: wait" in copied.read_text()
    assert "main.py exited" not in copied.read_text()  # killed before the end: the SIGTERM copy


# ------------------------------------------------------------------------------------------
# Real JAX on TPU VMs as JAX sees them: the metadata server and PCI bus of tests/fake_metadata.py
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tpu_slice(tmp_path, workers, devices, accelerator, main=None):
    """A pod in a box whose workers' python is this one on `devices` CPU devices, with libtpu
    "installed" (TPU_LIBRARY_PATH: a placeholder, never loaded) and each VM's PCI bus showing
    TPU chips; `main` replaces main.py (a probe). Yields (env, gcloud state, workdir)."""
    reason = fake_metadata.missing()
    if reason:
        pytest.skip(reason)
    libtpu = tmp_path / "libtpu.so"
    libtpu.write_text("a placeholder: JAX only checks that the file exists\n")
    replace = f'if [ "$1" = main.py ]; then shift; set -- {main} "$@"; fi\n' if main else ""
    python = write_executable(
        tmp_path / "python",
        (
            "#!/bin/sh\n"
            # install's check of the venv (the real one imports jax: seconds per worker)
            'if [ "$1" = -c ]; then echo "python 3.11 jax (this one) torch absent"; exit 0; fi\n'
            f"export JAX_PLATFORMS=cpu XLA_FLAGS='{xla_flags(devices)}' "
            f"TPU_LIBRARY_PATH={libtpu}\n{replace}"
            f'exec {sys.executable} "$@"\n'
        ),
    )
    with pod_in_a_box(tmp_path, python, workers) as (env, state):
        env.update(
            FAKE_TPU_PCI=fake_metadata.write_pci_bus(tmp_path / "pci"),
            FAKE_PREEMPT_GRACE_S="120",
            POLL_SECONDS="0.5",
            PYTHONPATH=ROOT,
            ACCELERATOR=accelerator,
        )
        yield env, state, tmp_path / "run"


def test_jax_finds_a_four_host_slice_through_the_metadata_server(tmp_path):
    """4 VMs x 2 CPU devices of a v4-16 (8 devices): JAX's GceTpuCluster detects the slice from
    the PCI bus and the metadata server alone; distributed.plan_launch agrees, the bare
    jax.distributed.initialize() joins the 4 processes, and a collective sees all of them."""
    with tpu_slice(tmp_path, 4, 2, "v4-16", main=os.path.join(ROOT, "tests", "tpu_probe.py")) as (env, state, workdir):
        status, output = supervise(env, workdir)
    assert status == 0, output
    assert "the run finished on all 4 workers (the slice was lost 0 times, the run crashed 0 times)" in output
    for k in range(4):
        probe = json.loads((workdir / f"probe-{k}.json").read_text())
        assert probe["cluster"] == "GceTpuCluster"
        assert probe["launch"] == {"initialize": True, "source": "gcetpu", "num_processes": 4, "process_id": k}
        assert probe["expected"] == [8, "TPU: v4-16"]
        assert probe["describe"] == f"process {k} of 4 (gcetpu): 2 local / 8 global cpu devices; launcher: TPU: v4-16"
        assert probe["gathered"] == [[0, 2], [1, 2], [2, 2], [3, 2]]


def metrics_steps(workdir) -> list[int]:
    path = workdir / "metrics.jsonl"
    return (
        [json.loads(line)["step"] for line in path.read_text().splitlines() if '"step"' in line]
        if path.exists()
        else []
    )


def test_a_spot_preemption_mid_run_recreates_the_slice_and_the_run_resumes_bitwise(
    tmp_path, tmp_path_factory, data_dir
):
    """main.py on a one-VM slice of 2 CPU devices ("v4-4": no such slice is sold, the smallest v4
    has 4 chips; it is the type whose device count is 2), preempted mid-run: the worker saves,
    the slice is recreated, the run resumes bit for bit. One VM of the reference run's shape, so
    that both attempts read its compiled step from the cache; the multi-host side of a
    preemption (JAX's preemption sync point across processes) is test_train's two-process
    SIGTERM, and JAX's detection of a multi-VM slice is the four-host test above."""
    reference = reference_run(tmp_path_factory.getbasetemp(), data_dir)
    with tpu_slice(tmp_path, 1, 2, "v4-4") as (env, state, workdir):
        supervisor = start_supervise(env, workdir, config="configs/demo.py", flags=tiny_run_flags(data_dir))
        try:
            wait_until(lambda: any(step >= 1 for step in metrics_steps(workdir)), "the run trains", timeout=600)
            subprocess.run(["gcloud", "compute", "tpus", "tpu-vm", "fake-preempt"], env=env, check=True, timeout=150)
        finally:
            status, output = finish(supervisor, timeout=600)
    assert status == 0, output
    assert "vicregl is PREEMPTED: deleting it to create it again (lost 1 times)" in output
    assert "the run finished on all 1 workers (the slice was lost 1 times, the run crashed 0 times)" in output
    logs = workdir / "logs"
    first, second = (logs / "worker-0.attempt-1.log").read_text(), (logs / "worker-0.attempt-2.log").read_text()
    assert "2 local / 2 global cpu devices" in first
    assert "Stopping at step" in first and "main.py exited with status 75" in first
    assert f"of {TOTAL_STEPS}" in second and "Resuming from" in second and "main.py exited with status 0" in second
    assert_bitwise_equal(workdir, reference)
