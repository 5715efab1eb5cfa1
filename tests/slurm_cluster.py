"""A real one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd of
Debian's slurm-wlm, on loopback ports, with every file in one folder.

    with SlurmCluster(folder, cpus=2) as cluster:
        job = cluster.sbatch([...], env)
        cluster.wait_for(job, "COMPLETED")

Needs root (the daemons run as root, as CI does) and `apt-get install slurm-wlm munge`;
missing() says which of the two is missing.
"""

import os
import re
import shutil
import signal
import subprocess
import time

from helpers import free_ports

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "vicregl-node"


def missing() -> str | None:
    """Returns why a cluster cannot start here, or None when it can."""
    absent = [
        d
        for d in DAEMONS + ("sbatch", "scontrol", "scancel")
        if shutil.which(d) is None and not os.path.exists(f"/usr/sbin/{d}")
    ]
    if absent:
        return f"{', '.join(absent)} not installed: `apt-get install -y slurm-wlm munge` (the CI script does)"
    if os.geteuid() != 0:
        return "the SLURM daemons of the tests run as root (as in CI); this user is not root"
    return None


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """munged + slurmctld + slurmd in the foreground, stopped (and waited for) on exit."""

    def __init__(self, folder, cpus: int = 2, kill_wait_s: int = 120, grace_time_s: int = 120):
        self.folder = str(folder)
        self.cpus = cpus
        self.kill_wait_s = kill_wait_s
        self.grace_time_s = grace_time_s
        self.procs: list[subprocess.Popen] = []
        self.conf = os.path.join(self.folder, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del self.env[key]

    def _write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(f, sub), exist_ok=True)
        os.chmod(os.path.join(f, "munge"), 0o700)
        with open(os.path.join(f, "munge", "munge.key"), "wb") as key:
            key.write(os.urandom(1024))
        os.chmod(os.path.join(f, "munge", "munge.key"), 0o600)
        ctld_port, slurmd_port = free_ports(2)
        lines = [
            "ClusterName=vicregltest",
            "SlurmctldHost=localhost(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={f}/munge/munge.socket",
            f"StateSaveLocation={f}/state",
            f"SlurmdSpoolDir={f}/spool",
            f"SlurmctldPidFile={f}/slurmctld.pid",
            f"SlurmdPidFile={f}/slurmd.pid",
            f"SlurmctldLogFile={f}/slurmctld.log",
            f"SlurmdLogFile={f}/slurmd.log",
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "SchedulerParameters=sched_interval=1",
            # The seconds between SIGTERM and SIGKILL of scancel / scontrol requeue: the run's save.
            f"KillWait={self.kill_wait_s}",
            "SlurmdTimeout=300",
            "InactiveLimit=0",
            "MinJobAge=600",
            "SlurmdParameters=config_overrides",
            # Preemption as on a shared cluster: a job of the higher tier (partition "urgent")
            # requeues a job of "debug" after SIGTERM and GraceTime seconds to save.
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=EXCLUSIVE "
            f"PriorityTier=1 GraceTime={self.grace_time_s}",
            f"PartitionName=urgent Nodes={NODE} MaxTime=INFINITE State=UP OverSubscribe=EXCLUSIVE "
            "PriorityTier=2 PreemptMode=OFF",
        ]
        with open(self.conf, "w") as conf:
            conf.write("\n".join(lines) + "\n")

    def _start(self, argv: list[str]) -> None:
        log = open(os.path.join(self.folder, os.path.basename(argv[0]) + ".out"), "w")
        self.procs.append(
            subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def __enter__(self):
        self._write_config()
        f = self.folder
        self._start(
            [
                _daemon("munged"),
                "--foreground",
                "--force",
                f"--socket={f}/munge/munge.socket",
                f"--key-file={f}/munge/munge.key",
                f"--pid-file={f}/munge/munged.pid",
                f"--log-file={f}/munge/munged.log",
                f"--seed-file={f}/munge/munged.seed",
            ]
        )
        self._wait(lambda: os.path.exists(f"{f}/munge/munge.socket"), "munged's socket", 30)
        self._start([_daemon("slurmctld"), "-D", "-i", "-f", self.conf])
        self._start([_daemon("slurmd"), "-D", "-N", NODE, "-f", self.conf])
        try:
            self._wait(lambda: "State=IDLE" in self.scontrol("show", "node", NODE, check=False), "the node idle", 60)
        except AssertionError:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait(self, condition, what: str, timeout: float) -> None:
        end = time.time() + timeout
        while not condition():
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(
                        f"{p.args[0]} exited with {p.returncode} while waiting for {what}: {self.logs()}"
                    )
            assert time.time() < end, f"timed out waiting for {what}: {self.logs()}"
            time.sleep(0.2)

    def logs(self) -> str:
        """Returns the tail of every daemon's log."""
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.out"):
            path = os.path.join(self.folder, name)
            if os.path.exists(path):
                out.append(f"--- {name}\n" + "".join(open(path, errors="replace").readlines()[-15:]))
        return "\n".join(out)

    def __exit__(self, *exc):
        # Jobs first (their tasks are children of slurmd's stepd), then the daemons.
        subprocess.run(
            ["scancel", "--full", "--signal=KILL", "--partition=debug,urgent"],
            env=self.env,
            capture_output=True,
            timeout=30,
        )
        for partition in ("debug", "urgent"):
            subprocess.run(["scancel", f"--partition={partition}"], env=self.env, capture_output=True, timeout=30)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        return False

    def scontrol(self, *args: str, check: bool = True) -> str:
        """Returns scontrol's output."""
        run = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30)
        if check:
            assert run.returncode == 0, run.stderr
        return run.stdout + run.stderr

    def sbatch(self, argv: list[str], env: dict, cwd: str) -> int:
        """Submits a batch job and returns its id."""
        run = subprocess.run(
            ["sbatch", "--parsable", *argv],
            env={**env, "SLURM_CONF": self.conf},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 0, run.stderr + self.logs()
        return int(run.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """Returns `scontrol show job`'s fields of a job."""
        text = self.scontrol("show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def run_time_s(self, job_id: int) -> int:
        """Returns the seconds the job has run (its RunTime, [D-]HH:MM:SS)."""
        days, _, clock = self.job(job_id)["RunTime"].rpartition("-")
        hours, minutes, seconds = map(int, clock.split(":"))
        return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds

    def wait_for(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict:
        """Waits until the job is in one of states; returns its fields."""
        end = time.time() + timeout
        while True:
            fields = self.job(job_id)
            if fields.get("JobState") in states:
                return fields
            assert time.time() < end, f"job {job_id} is {fields.get('JobState')} after {timeout} s: {self.logs()}"
            time.sleep(0.5)
