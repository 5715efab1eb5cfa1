"""Helpers the tests share: free loopback ports, the environment of a worker subprocess, a
closeness check with a relative scale, and torch without autograd.

Standard library only at import: the fake gcloud (a script run many times per test) imports
this module too.
"""

import contextlib
import os
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's CPU code generation without LLVM's optimisations: the tests compile some hundreds of
# small programs whose run time is negligible, and compile them about 30% faster so (in the
# test processes and every process they start). The floating-point semantics stay the same (no
# fast-math either way); the product itself never sets these.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """Returns XLA_FLAGS for a test process with `devices` virtual CPU devices."""
    return f"{FAST_COMPILE_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


def free_ports(n: int) -> list[int]:
    """Returns n distinct TCP ports that are free on 127.0.0.1 now (held together while found)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    """Returns a TCP port that is free on 127.0.0.1 now."""
    return free_ports(1)[0]


def worker_env(**extra) -> dict[str, str]:
    """Returns the environment of a subprocess: this checkout first on the path, so workers
    import the code under test whether or not (or from wherever) the package is installed."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else ""), **extra}


def assert_close(actual, expected, rtol: float = 1e-4) -> None:
    """Asserts equal shapes and max |actual - expected| <= rtol times the largest |expected|."""
    import numpy as np

    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.max(np.abs(expected))
    err = np.max(np.abs(actual - expected))
    assert err <= rtol * scale, f"max abs error {err:.3g} vs output scale {scale:.3g}"


def torch_no_grad():
    """Runs a test with torch's autograd off: make it a module's fixture with
    `no_torch_grad = pytest.fixture(autouse=True)(torch_no_grad)`."""
    import torch

    with torch.no_grad():
        yield
