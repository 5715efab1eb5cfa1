"""The Storage emulator of the tests: one per session, started by the first test that asks.

Session-wide because the libraries read its settings (endpoints, CA bundle) once per process
(TensorStore's and ArrayRecord's clients): one emulator keeps them valid for the whole run.
"""

import pytest

from vicregl_jax.storage_emulator import StorageEmulator

BUCKET = "vicregl-test"


@pytest.fixture(scope="session")
def storage_emulator():
    """A running StorageEmulator with bucket BUCKET, its environment applied to os.environ (so
    to the processes tests start); stopped, with its server process, at the end."""
    emulator = StorageEmulator([BUCKET]).start()
    emulator.apply()
    try:
        yield emulator
    finally:
        emulator.stop()
