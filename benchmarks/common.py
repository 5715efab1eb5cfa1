"""What the benchmarks share: one timing harness, one peak-memory formula, FLOPs of the
lowered program, the accelerators' peak FLOP/s, table printing, and the collectives of a
compiled program (what each moves, per named scope).

Run the benchmarks from the repository root (`python benchmarks/x.py`): this folder is the
script's folder, so `import common` finds this module.
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# The repository root on the path, so that the benchmarks import this checkout's package and
# tests/ (the PyTorch reference modules) however the package is installed. A comparison with
# another revision (efficiency_bench.py) points VICREGL_BENCH_PACKAGE at that revision's
# checkout: its vicregl_jax and configs/ are then the ones used.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_ROOT = os.environ.get("VICREGL_BENCH_PACKAGE") or ROOT
for path in (ROOT, PACKAGE_ROOT):
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)

# Dense bfloat16 peak TFLOP/s per chip, by jax device_kind prefix.
PEAK_TFLOPS = {
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
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
    return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


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


# --------------------------------------------------------------------------------------------
# Collectives of a compiled program
# --------------------------------------------------------------------------------------------

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (" + "|".join(COLLECTIVE_KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One array moved by a collective of a compiled (SPMD, per-device) program."""

    kind: str  # one of COLLECTIVE_KINDS
    dtype: str
    shape: tuple  # of the result on one device
    group: int  # devices taking part
    count: int  # times it runs per call of the program (the trip counts of enclosing loops)
    op_name: str  # the JAX name stack of the operation (named scopes, transpose(...) for gradients)

    @property
    def result_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _DTYPE_BYTES[self.dtype]

    @property
    def operand_bytes(self) -> float:
        """Bytes of the operand on one device, per call of the program."""
        factor = {"all-gather": 1 / self.group, "reduce-scatter": self.group}.get(self.kind, 1)
        return self.count * self.result_bytes * factor

    @property
    def moved_bytes(self) -> float:
        """Bytes one device sends per call of the program, by the bandwidth-optimal (ring)
        algorithms: an all-reduce is a reduce-scatter then an all-gather, so it sends twice
        what either of those sends for the same array."""
        g, n = self.group, self.result_bytes
        per_call = {
            "all-reduce": 2 * (g - 1) / g * n,
            "all-gather": (g - 1) / g * n,
            "reduce-scatter": (g - 1) * n,
            "all-to-all": (g - 1) / g * n,
        }.get(self.kind, n)
        return self.count * per_call


def _group_size(line: str, num_partitions: int) -> int:
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line):
        return int(m.group(2))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        sizes = {k.strip("' "): int(v) for k, v in (a.split("=") for a in m.group(1).split(","))}
        return int(np.prod([sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip()]))
    return num_partitions


def _op_names(line: str, n: int) -> list[str]:
    """Returns the op_name of each of the n arrays of an instruction: XLA joins those of the
    operations it combined as prefix/(name_1:name_2:...)."""
    m = re.search(r'op_name="([^"]*)"', line)
    name = m.group(1) if m else ""
    start = name.find("/(")
    if n > 1 and start >= 0 and name.endswith(")"):
        parts, depth, current = [], 0, ""
        for ch in name[start + 2 : -1]:
            depth += (ch == "(") - (ch == ")")
            if ch == ":" and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += ch
        parts.append(current)
        if len(parts) == n:
            return [name[: start + 1] + p for p in parts]
    return [name] * n


def collectives(hlo_text: str) -> list[Collective]:
    """Returns every array moved by a collective in a compiled program's text
    (`compiled.as_text()`), with how many times it runs per call (loop trip counts)."""
    partitions = re.search(r"num_partitions=(\d+)", hlo_text)
    num_partitions = int(partitions.group(1)) if partitions else 1
    computations, current = [], None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(", line)
        if header and line.rstrip().endswith("{"):
            current = (header.group(1), line.startswith("ENTRY"), [])
            computations.append(current)
        elif current is not None and line.strip() and line.strip() != "}":
            current[2].append(line)
    counts = {name: (1 if entry else 0) for name, entry, _ in computations}
    for name, _, lines in reversed(computations):  # callers come after their callees
        for line in lines:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            for role, callee in _CALLEE.findall(line):
                if callee in counts:
                    loop = role in ("body", "condition") and trips
                    counts[callee] += counts[name] * (int(trips.group(1)) if loop else 1)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    counts[callee] = counts.get(callee, 0) + counts[name]
    out = []
    for name, _, lines in computations:
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m or not counts.get(name):
                continue
            result, kind, is_async = m.groups()
            arrays = _ARRAY.findall(result)
            if is_async and kind == "all-gather":
                arrays = arrays[len(arrays) // 2 :]  # (operands, results)
            elif is_async and kind == "collective-permute":
                arrays = arrays[:1]
            group = _group_size(line, num_partitions)
            for (dtype, dims), op_name in zip(arrays, _op_names(line, len(arrays))):
                shape = tuple(int(d) for d in dims.split(",") if d)
                out.append(Collective(kind, dtype, shape, group, counts[name], op_name))
    return out


def scope_of(op_name: str, scopes) -> str:
    """Returns the first of scopes that is a component of op_name's name stack, else "other"."""
    for scope in scopes:
        if re.search(r"(^|[/(])" + re.escape(scope) + r"($|[/)])", op_name):
            return scope
    return "other"


def collective_totals(items: list[Collective], scopes=("criterion",)) -> dict:
    """Returns {(scope, kind): (arrays, operand bytes, moved bytes)} per call of the program."""
    totals = {}
    for c in items:
        key = (scope_of(c.op_name, scopes), c.kind)
        n, operand, moved = totals.get(key, (0, 0.0, 0.0))
        totals[key] = (n + c.count, operand + c.operand_bytes, moved + c.moved_bytes)
    return totals


# --------------------------------------------------------------------------------------------
# Where a profiled program spends its time
# --------------------------------------------------------------------------------------------


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Returns {instruction name: JAX op_name} of every instruction of a compiled program.

    Instructions XLA made without one (e.g. the convolutions it rewrites a depthwise kernel
    gradient into) take the op_name of their first operand that has one.
    """
    out, operands = {}, {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*?[\w\-]+\(([^)]*)\)", line)
        if not m:
            continue
        name = m.group(1)
        op_name = re.search(r'op_name="([^"]*)"', line)
        if op_name:
            out[name] = op_name.group(1)
        else:
            operands[name] = re.findall(r"%([\w.\-]+)", m.group(2))
    for _ in range(3):  # operands may themselves have inherited theirs
        for name, args in operands.items():
            if name not in out:
                inherited = next((out[a] for a in args if a in out), None)
                if inherited is not None:
                    out[name] = inherited
    return out


def trace_op_times(trace_dir: str) -> dict[tuple[str, str], float]:
    """Returns {(hlo module, hlo op): summed duration in seconds} of the per-operation events of
    the newest jax.profiler trace under trace_dir (XLA:CPU thunks, GPU kernels)."""
    import glob
    import gzip
    import json

    files = sorted(
        glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
        key=os.path.getmtime,
    )
    if not files:
        raise FileNotFoundError(f"no trace under {trace_dir}: was it written by jax.profiler.trace?")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times: dict[tuple[str, str], float] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "hlo_op" in args:
            key = (args.get("hlo_module", ""), args["hlo_op"])
            times[key] = times.get(key, 0.0) + float(e.get("dur", 0.0)) * 1e-6
    return times


def time_split(trace_dir: str, hlo_text: str, scopes, module_prefix: str = "") -> list[dict]:
    """Returns rows: for each named scope (and "other"), the summed time of the program's
    operations in the trace, forward and backward (op names with transpose(...)), and shares."""
    names = hlo_op_names(hlo_text)
    totals: dict[str, list[float]] = {s: [0.0, 0.0] for s in (*scopes, "other")}
    for (module, op), seconds in trace_op_times(trace_dir).items():
        if module_prefix and not module.startswith(module_prefix):
            continue
        op_name = names.get(op, "")
        backward = "transpose(" in op_name
        totals[scope_of(op_name, scopes)][backward] += seconds
    grand = sum(sum(v) for v in totals.values()) or 1.0
    return [
        {
            "part": scope,
            "forward": f"{fwd * 1e3:.1f} ms",
            "backward": f"{bwd * 1e3:.1f} ms",
            "share": f"{100 * (fwd + bwd) / grand:.1f}%",
        }
        for scope, (fwd, bwd) in totals.items()
    ]
