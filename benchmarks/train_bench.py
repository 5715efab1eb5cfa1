"""Speed and memory of the full pre-training step (model + criterion + optimiser).

    python benchmarks/train_bench.py                                 # CPU: batch 8, float32
    python benchmarks/train_bench.py --batch-per-device 128 --dtype bfloat16   # a GPU / TPU

For configs/r50.py and configs/convnext_s.py (their crops, heads, optimiser and sharding),
on synthetic batches of the right shapes (the input pipeline is benchmarked on its own in
pipeline_bench.py): compile time, step time (median after a warm-up), images/s, peak memory
(per device: on GPU / TPU the allocator's peak bytes in use; on CPU XLA's memory analysis
of the compiled step, arguments + outputs + temporaries)
and the model FLOP utilisation (the FLOPs of the lowered step, see step_flops, / step time /
peak FLOP/s of all devices, when the peak is known or given with --peak-tflops).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vicregl_jax import data as data_lib
from vicregl_jax import sharding, train
from vicregl_jax.config import config_module

from model_bench import peak_tflops  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
    return config_module(os.path.join(ROOT, "configs", f"{name}.py")).get_config(arg)


def synthetic_batch(config, batch: int, seed: int = 0) -> dict:
    """Returns a batch of the pipeline's format: normalised views, true crop grids, labels."""
    rng = np.random.default_rng(seed)
    views, grids = [], []
    for size, count, lo, hi in config.crops:
        n = size // 32
        views.append(rng.normal(size=(batch, count, size, size, 3)).astype(np.float32))
        side = np.sqrt(rng.uniform(lo, hi, size=(batch, count))) * 400
        top, left = rng.uniform(0, 100, size=(2, batch, count))
        grids.append(data_lib.location_grid(top, left, side, side, n))
    return {"views": tuple(views), "grids": tuple(grids), "label": rng.integers(0, config.num_classes, size=batch).astype(np.int32)}


def step_flops(lowered) -> float:
    """Returns the FLOPs of one step of the whole (global) batch.

    From the cost analysis of the lowered program, before XLA's backend passes: the compiled
    program's analysis misses what GPU backends turn into library calls (cuDNN convolutions,
    cuBLAS matmuls: it gave 0.5 GFLOP per ResNet-50 image on an H200 instead of 24) and
    counts XLA:CPU's dense lowering of grouped convolutions.
    """
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def bench(name: str, batch_per_device: int, dtype: str, repeats: int, peak_override: float | None):
    config = load_config(name)
    mesh = sharding.make_mesh()
    config.batch_size = batch_per_device * mesh.size
    config.compute_dtype = dtype
    config.total_steps = 1000
    schedule, tx = train.schedule_and_optimizer(config, steps_per_epoch=100, total_steps=1000)
    graphdef, state, shardings = train.init_train_state(config, tx, mesh)
    step = train.jit_train_step(train.make_train_step(graphdef, tx, schedule, train.loss_config(config)), shardings, mesh)
    batch = data_lib.to_global_batch(synthetic_batch(config, config.batch_size), mesh)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak_bytes = None if mem is None else mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    flops = step_flops(lowered)
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:  # what the device allocator really held
        peak_bytes = stats["peak_bytes_in_use"]
    kind = jax.devices()[0].device_kind
    peak = peak_tflops(jax.devices()[0], peak_override)
    mfu = None if not peak or not flops else flops / step_s / (peak * 1e12 * mesh.size)
    return {
        "config": name, "device": f"{kind} x {mesh.size}", "dtype": dtype, "batch": config.batch_size,
        "compile": f"{compile_s:.1f} s", "step": f"{step_s * 1e3:.0f} ms",
        "images/s": f"{config.batch_size / step_s:.1f}",
        "peak mem/device": "n/a" if peak_bytes is None else f"{peak_bytes / 2**30:.2f} GiB",
        "GFLOP/step": f"{flops / 1e9:.0f}", "MFU": "n/a" if mfu is None else f"{100 * mfu:.1f}%",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="r50,convnext_s")
    parser.add_argument("--batch-per-device", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for the MFU column")
    args = parser.parse_args()
    rows = []
    for name in args.configs.split(","):
        rows.append(bench(name, args.batch_per_device, args.dtype, args.repeats, args.peak_tflops))
        print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)  # in case a later one fails
    header = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[h]).ljust(w) for h, w in zip(header, widths)) + " |")


if __name__ == "__main__":
    main()
