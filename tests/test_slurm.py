"""launch/slurm.sbatch on a real SLURM (Debian's slurm-wlm: munged, slurmctld and slurmd on this
machine, tests/slurm_cluster.py): one job of the tiny pre-training run goes through a cluster's
three ways of stopping a job, each time saving, exiting 75, being requeued and resuming:

1. its time limit: `scontrol update TimeLimit=` brings the end within the script's
   --signal=B:TERM@120, so SLURM's own warning reaches the batch script, whose trap passes it on;
2. `scontrol requeue` by hand: SLURM sends SIGTERM to the script and the tasks, KillWait later
   SIGKILL, and requeues the job itself;
3. a preemption: a job of a higher partition tier takes the node; the tasks get SIGTERM and
   GraceTime seconds, the script requeues the job;

and the fourth start ends bit for bit where an uninterrupted run ends.

SLURM acts on time limits every 30 seconds or so (its background loop), the run's steps take a
fraction of a second: before each event the test stops the training process (SIGSTOP) so that it
is mid-run when SIGTERM lands, as a run with long steps would be; SLURM's SIGCONT (or the test's,
once SIGTERM is pending) lets it go on."""

import json
import os
import re
import signal
import sys

import pytest
import slurm_cluster
from launch_helpers import ROOT, TOTAL_STEPS, assert_bitwise_equal, reference_run, run_env, tiny_run_flags, wait_until

SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
EVENT_TIMEOUT_S = 600
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)

pytestmark = pytest.mark.skipif(slurm_cluster.missing() is not None, reason=str(slurm_cluster.missing()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # KillWait and GraceTime: the seconds a stopped run has to save (a few here).
    with slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2, kill_wait_s=30, grace_time_s=60) as up:
        yield up


def metrics_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line)["step"] for line in open(path) if '"step"' in line]


def training_pid(workdir) -> int | None:
    """Returns the pid of main.py training into workdir (the job's task), or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv[1:2] == [b"main.py"] and f"--workdir={workdir}".encode() in argv:  # not srun's argv
            return int(pid)
    return None


def sigterm_pending(pid: int) -> bool:
    """Returns whether SIGTERM waits for the (stopped) process pid."""
    status = open(f"/proc/{pid}/status").read()
    return any(int(v, 16) & SIGTERM_BIT for v in re.findall(r"^(?:ShdPnd|SigPnd):\s*([0-9a-f]+)", status, re.M))


def hold_mid_run(workdir, after_step: int) -> int:
    """Waits until the run has logged a step past after_step, stops it (SIGSTOP) and returns its pid."""
    past = f"a step past {after_step}"
    wait_until(lambda: max(metrics_steps(workdir), default=0) > after_step, past, EVENT_TIMEOUT_S)
    pid = training_pid(workdir)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    return pid


def release_when_requeued(cluster, job: int, restarts: int) -> None:
    """Waits for the job's requeue (Restarts=restarts) and lets it start now: SLURM holds a
    requeued job back for a while (Reason=BeginTime)."""
    wait_until(lambda: cluster.job(job).get("Restarts") == str(restarts), f"requeue {restarts}", EVENT_TIMEOUT_S)
    wait_until(lambda: cluster.job(job).get("JobState") == "PENDING", f"requeue {restarts} pending", EVENT_TIMEOUT_S)
    cluster.scontrol("update", f"JobId={job}", "TimeLimit=15", "StartTime=now")


def stopped_at(workdir, job: int, restart: int) -> int:
    """Returns the step at which start `restart` of the job saved and stopped after SIGTERM."""
    log = open(os.path.join(workdir, "logs", f"vicregl-{job}-r{restart}-task0.log")).read()
    assert "SIGTERM received: saving a checkpoint" in log, log[-2000:]
    stopped = re.search(r"Stopping at step (\d+) \(checkpoint saved\)", log)
    assert stopped and int(stopped.group(1)) < TOTAL_STEPS, log[-2000:]
    return int(stopped.group(1))


def test_a_time_limit_a_requeue_and_a_preemption_each_save_requeue_and_resume_bitwise(
    cluster, tmp_path, tmp_path_factory, data_dir
):
    reference = reference_run(tmp_path_factory.getbasetemp(), data_dir)
    workdir = tmp_path / "run"
    env = {**run_env(2), "PYTHON": sys.executable, "TASK_EXIT_WAIT": "60"}
    # Command-line options win over the script's #SBATCH lines: no GPUs here, output beside the test.
    argv = [f"--output={tmp_path}/%x-%j.out", "--gpus-per-node=0", "--time=15", SBATCH, "configs/demo.py"]
    job = cluster.sbatch([*argv, str(workdir), *tiny_run_flags(data_dir)], env, ROOT)
    out = tmp_path / f"vicregl-{job}.out"

    # 1. The time limit: 2 minutes past the minute begun, within --signal=B:TERM@120.
    pid = hold_mid_run(workdir, 0)
    cluster.scontrol("update", f"JobId={job}", f"TimeLimit={cluster.run_time_s(job) // 60 + 2}")
    wait_until(lambda: sigterm_pending(pid), "SLURM's time-limit warning reaches the task", EVENT_TIMEOUT_S)
    os.kill(pid, signal.SIGCONT)
    release_when_requeued(cluster, job, 1)
    first = stopped_at(workdir, job, 0)

    # 2. scontrol requeue: SIGCONT and SIGTERM to every process of the job, SIGKILL KillWait later.
    hold_mid_run(workdir, first)
    cluster.scontrol("requeue", str(job))
    release_when_requeued(cluster, job, 2)
    second = stopped_at(workdir, job, 1)

    # 3. A preemption: a job of the higher tier needs the node; SIGCONT and SIGTERM to the tasks.
    hold_mid_run(workdir, second)
    urgent = cluster.sbatch(["--partition=urgent", f"--output={tmp_path}/urgent-%j.out", "--wrap=true"], env, ROOT)
    cluster.wait_for(urgent, ("COMPLETED",), EVENT_TIMEOUT_S)
    release_when_requeued(cluster, job, 3)
    third = stopped_at(workdir, job, 2)

    fields = cluster.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), EVENT_TIMEOUT_S)
    text = out.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text
    assert 1 <= first < second < third < TOTAL_STEPS, (first, second, third)
    # The batch script's trap saw events 1 and 2 (a preemption signals the tasks alone; SLURM's
    # own requeue after the script's sends it once more); the script requeued the job itself
    # after 1 and 3 (srun's status 75), SLURM did after 2 (srun and the script killed at KillWait).
    assert text.count(f"vicregl: job {job} got SIGTERM: asking every task to save") >= 2, text
    requeued = f"vicregl: job {job} saved a checkpoint after SIGTERM (time limit or preemption): requeueing"
    assert text.count(requeued) >= 2, text
    assert f"JOB {job} ON {slurm_cluster.NODE} CANCELLED AT" in text and "DUE TO JOB REQUEUE" in text, text
    logs = workdir / "logs"
    assert ": 2 local / 2 global cpu devices" in (logs / f"vicregl-{job}-r0-task0.log").read_text()
    for restart, step in ((1, first), (2, second), (3, third)):
        log = (logs / f"vicregl-{job}-r{restart}-task0.log").read_text()
        assert re.search(rf"Resuming from .* at step {step} of {TOTAL_STEPS}", log), log[-2000:]
    assert_bitwise_equal(workdir, reference)
