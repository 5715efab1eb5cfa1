"""launch/slurm.sbatch on a real SLURM (Debian's slurm-wlm: munged, slurmctld and slurmd on this
machine, tests/slurm_cluster.py): the tiny pre-training run submitted with sbatch; a SIGTERM to
the batch script (what --signal=B:TERM@120 sends before the time limit) is
passed on to the task, which saves and exits 75, and the script requeues the job, which
resumes and ends bit for bit where the uninterrupted job ended."""

import json
import os
import re
import subprocess
import sys

import pytest
import slurm_cluster
from launch_helpers import ROOT, TOTAL_STEPS, assert_bitwise_equal, reference_run, run_env, tiny_run_flags, wait_until

SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
JOB_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(slurm_cluster.missing() is not None, reason=str(slurm_cluster.missing()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2) as running:
        yield running


def submit(cluster, tmp, workdir, data_dir) -> int:
    # Command-line options win over the script's #SBATCH lines: no GPUs here, output beside the test.
    env = {**run_env(2), "PYTHON": sys.executable, "TASK_EXIT_WAIT": "60"}
    return cluster.sbatch(
        [
            f"--output={tmp}/%x-%j.out",
            "--gpus-per-node=0",
            "--time=15",
            SBATCH,
            "configs/demo.py",
            str(workdir),
            *tiny_run_flags(data_dir),
        ],
        env,
        ROOT,
    )


def metrics_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line)["step"] for line in open(path) if '"step"' in line]


def test_sigterm_to_the_batch_script_saves_requeues_and_resumes_bitwise(cluster, tmp_path, tmp_path_factory, data_dir):
    """sbatch runs the real run; SIGTERM to the batch script alone (what Slurm sends before the
    time limit with --signal=B:TERM@120; preemption sends it to the tasks too) reaches the task
    through the script's trap, the task saves and exits 75, the script requeues the job, and
    the second start resumes and ends bit for bit where an uninterrupted run ends."""
    reference = reference_run(tmp_path_factory.getbasetemp(), data_dir)
    workdir = tmp_path / "run"
    job = submit(cluster, tmp_path, workdir, data_dir)
    wait_until(lambda: any(step >= 1 for step in metrics_steps(workdir)), "the job trains", JOB_TIMEOUT_S)
    subprocess.run(["scancel", "--batch", "--signal=TERM", str(job)], env=cluster.env, check=True, timeout=30)
    wait_until(lambda: cluster.job(job).get("Restarts") == "1", "the script requeues the job", JOB_TIMEOUT_S)
    # Slurm holds a requeued job back for about 2 minutes (Reason=BeginTime): let it start now.
    cluster.scontrol("update", f"JobId={job}", "StartTime=now", check=False)
    fields = cluster.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), JOB_TIMEOUT_S)
    out = open(tmp_path / f"vicregl-{job}.out").read()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", out
    assert f"vicregl: job {job} got SIGTERM: asking every task to save" in out
    assert f"vicregl: job {job} saved a checkpoint after SIGTERM (time limit or preemption): requeueing" in out
    first = open(workdir / "logs" / f"vicregl-{job}-r0-task0.log").read()
    second = open(workdir / "logs" / f"vicregl-{job}-r1-task0.log").read()
    assert ": 2 local / 2 global cpu devices" in first and "SIGTERM received: saving a checkpoint" in first
    stopped = re.search(r"Stopping at step (\d+) \(checkpoint saved\)", first)
    assert stopped and 1 <= int(stopped.group(1)) < TOTAL_STEPS, first[-2000:]  # it stopped early, saved
    assert re.search(rf"Resuming from .* at step {stopped.group(1)} of {TOTAL_STEPS}", second), second[-2000:]
    assert_bitwise_equal(workdir, reference)
