"""Test set-up: 8 virtual CPU devices, configured before JAX initialises, and shared fixtures."""
import os
import tempfile

# Must happen before jax is imported anywhere: sharding tests need 8 devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow must not grab an accelerator or spam the log in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session and the processes tests start: the same
# tiny train step is compiled by several tests and subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="vicregl_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from storage_fixture import storage_emulator  # noqa: E402,F401 - the session's Storage emulator


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir shared by the session: the embedded datasets are built there once."""
    return str(tmp_path_factory.mktemp("tfds"))
