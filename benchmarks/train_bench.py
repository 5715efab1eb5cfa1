"""Speed and memory of the full pre-training step (model + criterion + optimiser).

    python benchmarks/train_bench.py                                 # CPU: batch 8, float32
    python benchmarks/train_bench.py --batch-per-device 128 --dtype bfloat16   # a GPU / TPU

For configs/r50.py and configs/convnext.py:size=s (their crops, heads, optimiser and sharding),
on synthetic batches of the right shapes (the input pipeline is benchmarked on its own in
pipeline_bench.py): compile time, step time (median after a warm-up), images/s, peak memory
(per device: on GPU / TPU the allocator's peak bytes in use; on CPU XLA's buffer assignment
of the compiled step, common.compiled_peak_bytes) and the model FLOP utilisation (the FLOPs
of the lowered step / step time / peak FLOP/s of all devices, when the peak is known or
given with --peak-tflops).
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from common import ROOT, compile_jitted, device_peak_bytes, median_seconds, peak_tflops, print_table

from vicregl_jax import build, sharding, train
from vicregl_jax import config as config_lib
from vicregl_jax.data import location_grid  # TF-free: the train step runs without TensorFlow

CONFIGS = {"r50": "configs/r50.py", "convnext_s": "configs/convnext.py:size=s"}


def synthetic_batch(config, batch: int, seed: int = 0) -> dict:
    """Returns a batch of the pipeline's format: normalised views, true crop grids, labels."""
    rng = np.random.default_rng(seed)
    views, grids = [], []
    for size, count, lo, hi in config.data.crops:
        views.append(rng.normal(size=(batch, count, size, size, 3)).astype(np.float32))
        side = np.sqrt(rng.uniform(lo, hi, size=(batch, count))) * 400
        top, left = rng.uniform(0, 100, size=(2, batch, count))
        grids.append(location_grid(top, left, side, side, size // 32))
    labels = rng.integers(0, config.model.num_classes, size=batch).astype(np.int32)
    return {"views": tuple(views), "grids": tuple(grids), "label": labels}


def bench(name: str, batch_per_device: int, dtype: str, repeats: int, peak_override: float | None):
    config = config_lib.load(os.path.join(ROOT, CONFIGS[name]))
    mesh = sharding.make_mesh()
    config.batch_size = batch_per_device * mesh.size
    config.model.dtype = dtype
    config.total_steps = 1000
    schedule, tx = build.make_optimizer(config, steps_per_epoch=100, total_steps=1000)
    graphdef, streams, state, shardings = build.init_train_state(config, tx, mesh)
    step = train.jit_train_step(
        train.make_train_step(graphdef, streams, tx, schedule, build.loss_config(config)), shardings, mesh)
    batch = jax.tree.map(lambda x: jax.device_put(x, sharding.batch_sharding(mesh)),
                         synthetic_batch(config, config.batch_size))
    compiled = compile_jitted(step, state, batch)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled.fn(holder["state"], batch)
        jax.block_until_ready(metrics)

    step_s = median_seconds(one_step, repeats)
    peak_bytes = device_peak_bytes() or compiled.peak_bytes  # what the device allocator really held
    peak = peak_tflops(jax.devices()[0], peak_override)
    mfu = None if not peak or not np.isfinite(compiled.flops) else compiled.flops / step_s / (peak * 1e12 * mesh.size)
    return {
        "config": name, "device": f"{jax.devices()[0].device_kind} x {mesh.size}", "dtype": dtype,
        "batch": config.batch_size, "compile": f"{compiled.compile_s:.1f} s", "step": f"{step_s * 1e3:.0f} ms",
        "images/s": f"{config.batch_size / step_s:.1f}",
        "peak mem/device": "n/a" if peak_bytes is None else f"{peak_bytes / 2**30:.2f} GiB",
        "GFLOP/step": f"{compiled.flops / 1e9:.0f}", "MFU": "n/a" if mfu is None else f"{100 * mfu:.1f}%",
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
    print_table(rows)


if __name__ == "__main__":
    main()
