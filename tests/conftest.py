"""Test set-up: 8 virtual CPU devices, configured before JAX initialises, and shared fixtures."""

import os
import shutil
import tempfile

from helpers import xla_flags  # noqa: E402 - standard library only

# Must happen before jax is imported anywhere: sharding tests need 8 devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow must not grab an accelerator or spam the log in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's gs:// file system retries after ~1 s, doubling: 0.1 s in tests (read when it
# first reaches a bucket), so that the emulator's injected faults cost little time.
os.environ.setdefault("GCS_RETRY_CONFIG_INIT_DELAY_TIME_US", "100000")
# One persistent compilation cache for the session and the processes tests start: the same
# tiny train step is compiled by several tests and subprocesses. Every program, however quick
# to compile: a training process also compiles some 150 small ones (initialisation, colour
# chain, metrics) that every process the tests start would otherwise compile again.
# Under pytest-xdist the workers share one folder, named by the process that started them (the
# controller, which removes it at the end: pytest_unconfigure), so that a program one worker
# compiled is read by the other.
_CACHE = os.path.join(
    tempfile.gettempdir(), f"vicregl_jax_cache_{os.getppid() if os.environ.get('PYTEST_XDIST_WORKER') else os.getpid()}"
)
os.makedirs(_CACHE, exist_ok=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from storage_fixture import storage_emulator  # noqa: E402,F401 - the session's Storage emulator

# The order in which the files run under `-n 2 --dist loadfile --no-loadscope-reorder` (each
# file runs whole in one worker; xdist hands the next file to whichever worker is free): the
# longest first, those that mostly wait on other processes (SLURM's daemons, a simulated pod's
# workers, real preemptions) beside those that compute, so that no worker ends the run alone
# waiting. The other files follow as collected. (xdist's default reorder, by number of tests,
# would put the one-test SLURM file last.)
_FIRST = (
    "test_slurm.py",
    "test_train.py",
    "test_pod.py",
    "test_storage_faults.py",
    "test_evaluate.py",
    "test_efficiency.py",
    "test_data_failures.py",
    "test_segment.py",
    "test_models.py",
    "test_data_pipeline.py",
    "test_convert.py",
    "test_storage.py",
)


def pytest_collection_modifyitems(items):
    """Orders the collected tests: the files of _FIRST first (in that order), then the rest as
    collected (the same order in every xdist worker, as it must be)."""
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))


def pytest_unconfigure(config):
    """The controller (or a run without workers) removes the session's compilation cache."""
    if not hasattr(config, "workerinput"):
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir shared by the session: the embedded datasets are built there once."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """A workdir of the tiny config after 3 steps, with checkpoints 1, 2 and 3 (copy before use:
    tiny.copy_of)."""
    from tiny import tiny_config

    from vicregl_jax import train

    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.train_and_evaluate(tiny_config(data_dir, {"checkpoint.every_steps": 1}), workdir, stop_after_steps=3)
    return workdir


@pytest.fixture(scope="session")
def like(data_dir):
    """A fresh train state of the tiny config on 8 devices: the layout restores target."""
    from tiny import tiny_config

    from vicregl_jax import build, sharding

    config = tiny_config(data_dir)
    _, tx = build.make_optimizer(config, 10, config.total_steps)
    return build.init_train_state(config, tx, sharding.make_mesh(8))[2]
