"""What the launch tests share: main.py's flags for a tiny real run, a workdir's final
parameters, and waiting with a deadline."""

import fcntl
import os
import subprocess
import sys
import time

import jax
from helpers import xla_flags
from tiny import read_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 8


def tiny_run_flags(data_dir: str) -> list[str]:
    """Returns main.py flags (after --config=configs/demo.py) for a pre-training run of
    TOTAL_STEPS steps of the tiny network, a checkpoint every 2 steps; the same for every test,
    so that its compiled step is shared through the persistent compilation cache."""
    return [
        "--config.mode=pretrain",
        f"--config.data.data_dir={data_dir}",
        "--config.data.crops=((64,2,0.3,1.0),)",
        "--config.model.mlp=64-64",
        "--config.model.maps_mlp=32-32",
        "--config.model.num_classes=4",
        "--config.loss.num_matches=(3,2)",
        "--config.batch_size=16",
        f"--config.total_steps={TOTAL_STEPS}",
        "--config.checkpoint.every_steps=2",
        "--config.log_every_steps=1",
        "--config.optim.warmup_epochs=0",
        # One record per read: the launch tests compare runs of 1 and 2 processes, and with blocks
        # each host shuffles windows of its own (the order depends on the number of hosts).
        "--config.data.read_block=1",
    ]


def assert_bitwise_equal(workdir, reference) -> None:
    """Asserts that workdir's newest checkpoint is at the reference's step with every array
    bit for bit the same (parameters, batch statistics, optimiser state)."""
    step, tree = read_state(workdir)
    ref_step, ref_tree = reference
    assert step == ref_step == TOTAL_STEPS, (step, ref_step)
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(tree), jax.tree_util.tree_leaves_with_path(ref_tree)
    assert [p for p, _ in flat] == [p for p, _ in ref_flat]
    differ = [
        jax.tree_util.keystr(p)
        for (p, a), (_, b) in zip(flat, ref_flat)
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes()
    ]
    assert not differ, f"{len(differ)} of {len(flat)} arrays differ from the uninterrupted run: {differ[:5]}"


def wait_until(condition, what: str, timeout: float = 60):
    """Returns condition()'s first true value, polling; fails after timeout seconds."""
    end = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.time() < end, f"timed out waiting until {what}"
        time.sleep(0.1)


def run_env(devices: int) -> dict:
    """Returns the environment of a run started here: this checkout on the path, CPU with
    `devices` devices, no launcher variables of the parent."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "TPU_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))
    }
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
    return env


def reference_run(base, data_dir: str) -> tuple[int, dict]:
    """Returns read_state of the uninterrupted tiny run (one process, 2 CPU devices), run once
    per test session under `base` (the pod's 2 processes x 1 device and SLURM's 1 task x 2
    devices train bit for bit as it does). Under pytest-xdist the workers share it: it runs in
    the folder above their own (the session's), under a file lock."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = os.path.dirname(str(base))  # pytest-N/popen-gwK -> pytest-N, the workers' common folder
    folder = os.path.join(str(base), "launch_reference")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for the run instead of repeating it
        if not os.path.exists(os.path.join(folder, "done")):
            with open(os.path.join(folder, "main.log"), "w") as log:
                subprocess.run(
                    [
                        sys.executable,
                        "main.py",
                        "--config=configs/demo.py",
                        f"--workdir={folder}/run",
                        *tiny_run_flags(data_dir),
                    ],
                    cwd=ROOT,
                    env=run_env(2),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=600,
                    check=True,
                )
            open(os.path.join(folder, "done"), "w").close()
    return read_state(os.path.join(folder, "run"))
