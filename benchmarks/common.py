"""What the benchmarks share: one timing harness, one peak-memory formula, FLOPs of the
lowered program, the accelerators' peak FLOP/s, and table printing.

Run the benchmarks from the repository root (`python benchmarks/x.py`): this folder is the
script's folder, so `import common` finds this module.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax

# The repository root on the path, so that the benchmarks import this checkout's package and
# tests/ (the PyTorch reference modules) however the package is installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Dense bfloat16 peak TFLOP/s per chip, by jax device_kind prefix.
PEAK_TFLOPS = {
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0, "NVIDIA L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def peak_tflops(device, override: float | None = None) -> float | None:
    """Returns the device's peak TFLOP/s (override first), or None if unknown."""
    if override:
        return override
    for prefix, value in PEAK_TFLOPS.items():
        if device.device_kind.startswith(prefix):
            return value
    return None


def median_seconds(call: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Returns the median wall time of `repeats` calls of call() after `warmup` calls; call
    must block until its work is done (jax.block_until_ready, torch.cuda.synchronize)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled_peak_bytes(compiled) -> int | None:
    """Returns the peak bytes of a compiled program by XLA's buffer assignment: arguments +
    outputs + temporaries, less the outputs that alias donated arguments (counted once)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)


def device_peak_bytes() -> int | None:
    """Returns the peak bytes the first device's allocator has held, on GPU / TPU (None on CPU)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return stats.get("peak_bytes_in_use") if stats else None


def lowered_flops(lowered) -> float:
    """Returns the FLOPs of a lowered program (float("nan") when XLA gives none).

    The lowered program's cost analysis, before XLA's backend passes: the compiled program's
    misses what GPU backends turn into library calls (cuDNN convolutions, cuBLAS matmuls) and
    counts XLA:CPU's dense lowering of grouped convolutions.
    """
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


@dataclasses.dataclass
class Compiled:
    """A jitted function compiled for its arguments, with what compiling it told."""

    fn: Any
    compile_s: float
    flops: float
    peak_bytes: int | None


def compile_jitted(jitted, *args) -> Compiled:
    """Returns jitted (a jax.jit function) lowered and compiled for args, timed."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    return Compiled(compiled, time.perf_counter() - start, lowered_flops(lowered), compiled_peak_bytes(compiled))


def mib(nbytes) -> str:
    """Returns bytes as MiB, or n/a."""
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"


def print_table(rows: list[dict]) -> None:
    """Prints dict rows (same keys) as a markdown table."""
    header = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[h]).ljust(w) for h, w in zip(header, widths)) + " |", flush=True)
