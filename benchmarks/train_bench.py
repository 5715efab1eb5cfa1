"""Speed and memory of the full pre-training step (model + criterion + optimiser).

    python benchmarks/train_bench.py                                 # CPU: batch 8, float32
    python benchmarks/train_bench.py --batch-per-device 128 --dtype bfloat16   # a GPU / TPU
    python benchmarks/train_bench.py --profile /tmp/trace            # + a trace and its time split

For configs/r50.py and configs/convnext.py:size=s (their crops, heads, optimiser and sharding),
on synthetic batches of the right shapes (the input pipeline is benchmarked on its own in
pipeline_bench.py): compile time, step time (median after a warm-up), images/s, peak memory
(per device: on GPU / TPU the allocator's peak bytes in use; on CPU XLA's buffer assignment
of the compiled step, common.compiled_peak_bytes) and the model FLOP utilisation (the FLOPs
of the lowered step / step time / peak FLOP/s of all devices, when the peak is known or
given with --peak-tflops).

Batches are what the input pipeline sends (--views uint8): uint8 views with each view's colour
draws, the colour chain (jitter, grayscale, blur, solarize, normalisation) running inside the
step; "colour chain" times that chain alone, jitted over the same sharded batch, and
"colour / step" is its share of the step. --views float sends views already coloured and
normalised on the host (the pipeline before colour moved to the device), for comparison.

The backbone share (--backbone-share, on by default): the backbone alone (forward + backward in
train mode, same dtype and remat policy) over the same images, one compiled program per crop
size, timed in the same process; "step / share" is that time over the step's (1.0 would be a
step that costs nothing but its backbone).

--profile DIR writes a jax.profiler trace of --profile-steps steps to DIR and prints the time
split of the step's operations by the named scopes of the model, criterion and step
(backbone_<crop size>, heads, criterion, optimiser, augment; "other" is the rest), forward and
backward, from the trace's per-operation events (on CPU the thunks of XLA's runtime, which run
on several threads: their times add up to more than the step's wall time).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from common import ROOT, compile_jitted, device_peak_bytes, median_seconds, peak_tflops, print_table, time_split
from flax import nnx

from vicregl_jax import build, config_files, sharding, train
from vicregl_jax.data import colour, location_grid  # TF-free: the train step runs without TensorFlow
from vicregl_jax.model_config import create_model

CONFIGS = {"r50": "configs/r50.py", "convnext_s": "configs/convnext.py:size=s", "demo": "configs/demo.py"}


def synthetic_draws(rng, shape) -> dict:
    """Returns colour draws of the pipeline's format for views of leading shape `shape`, with
    every op's probability as the release draws it (jitter 0.8, grayscale 0.2, blur, solarize)."""
    odd = np.arange(shape[-1]) % 2 == 1
    order = np.argsort(rng.uniform(size=(*shape, 4)), axis=-1).astype(np.int32)
    jitter = rng.uniform(size=shape) < colour.JITTER_PROBABILITY
    return {
        "order": np.where(jitter[..., None], order, colour.NO_OP).astype(np.int32),
        "brightness": rng.uniform(1 - colour.BRIGHTNESS, 1 + colour.BRIGHTNESS, shape).astype(np.float32),
        "contrast": rng.uniform(1 - colour.CONTRAST, 1 + colour.CONTRAST, shape).astype(np.float32),
        "saturation": rng.uniform(1 - colour.SATURATION, 1 + colour.SATURATION, shape).astype(np.float32),
        "hue": rng.uniform(-colour.HUE, colour.HUE, shape).astype(np.float32),
        "grayscale": rng.uniform(size=shape) < colour.GRAYSCALE_PROBABILITY,
        "blur": rng.uniform(size=shape) < np.where(odd, *colour.BLUR_PROBABILITY[::-1]),
        "sigma": rng.uniform(*colour.BLUR_SIGMA, shape).astype(np.float32),
        "solarize": rng.uniform(size=shape) < np.where(odd, *colour.SOLARIZE_PROBABILITY[::-1]),
    }


def synthetic_batch(config, batch: int, seed: int = 0, views: str = "uint8") -> dict:
    """Returns a batch of the pipeline's format, true crop grids and labels: uint8 views with
    their colour draws (the colour chain runs in the step), or "float" views already coloured
    and normalised on the host."""
    rng = np.random.default_rng(seed)
    out, grids, draws = [], [], []
    for size, count, lo, hi in config.data.crops:
        if views == "uint8":
            out.append(rng.integers(0, 256, size=(batch, count, size, size, 3), dtype=np.uint8))
            draws.append(synthetic_draws(rng, (batch, count)))
        else:
            out.append(rng.normal(size=(batch, count, size, size, 3)).astype(np.float32))
        side = np.sqrt(rng.uniform(lo, hi, size=(batch, count))) * 400
        top, left = rng.uniform(0, 100, size=(2, batch, count))
        grids.append(location_grid(top, left, side, side, size // 32))
    labels = rng.integers(0, config.model.num_classes, size=batch).astype(np.int32)
    return {"views": tuple(out), "grids": tuple(grids), "label": labels, **({"draws": tuple(draws)} if draws else {})}


def colour_seconds(batch, dtype: str, repeats: int) -> float:
    """Returns the seconds of the colour chain alone (train.coloured_views: colour ops from the
    draws and normalisation, in the compute dtype) over the step's sharded uint8 batch."""
    chain = jax.jit(lambda b: tuple(v.astype(dtype) for v in train.coloured_views(b)))
    compiled = compile_jitted(chain, batch)
    return median_seconds(lambda: jax.block_until_ready(compiled.fn(batch)), repeats)


def backbone_seconds(config, batch: int, repeats: int) -> tuple[float, float]:
    """Returns (seconds, compile seconds) of the backbone's forward + backward (train mode) over
    the images of one step: per crop group, B x V_g images as one batch."""
    model = nnx.eval_shape(lambda: create_model(config.model, config.loss.alpha, rngs=nnx.Rngs(0))).backbone
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype), params)
    rest = jax.tree.map(
        lambda a: jax.random.key(0) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else jnp.zeros(a.shape, a.dtype),
        rest,
    )

    @jax.jit
    def step(params, x):
        def loss(params):
            maps, pooled = nnx.merge(graphdef, params, rest, copy=True)(x)
            return jnp.mean(jnp.square(maps)) + jnp.mean(jnp.square(pooled))

        return jax.grad(loss)(params)

    total = compile_total = 0.0
    for size, count, _, _ in config.data.crops:
        x = jax.random.normal(jax.random.key(1), (batch * count, size, size, 3))
        compiled = compile_jitted(step, params, x)
        compile_total += compiled.compile_s
        total += median_seconds(lambda: jax.block_until_ready(compiled.fn(params, x)), repeats)
    return total, compile_total


def bench(
    name: str,
    batch_per_device: int,
    dtype: str,
    repeats: int,
    peak_override: float | None,
    remat: str | None = None,
    profile: str | None = None,
    profile_steps: int = 3,
    backbone_share: bool = True,
    views: str = "uint8",
):
    config = config_files.load(os.path.join(ROOT, CONFIGS[name]))
    mesh = sharding.make_mesh()
    config.batch_size = batch_per_device * mesh.size
    config.model.dtype = dtype
    config.total_steps = 1000
    if remat:
        config.model.remat = remat
    schedule, tx = build.make_optimizer(config, steps_per_epoch=100, total_steps=1000)
    graphdef, streams, state, shardings = build.init_train_state(config, tx, mesh)
    step = train.jit_train_step(
        train.make_train_step(graphdef, streams, tx, schedule, build.loss_config(config)), shardings, mesh
    )
    batch = jax.tree.map(
        lambda x: jax.device_put(x, sharding.batch_sharding(mesh)),
        synthetic_batch(config, config.batch_size, views=views),
    )
    compiled = compile_jitted(step, state, batch)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled.fn(holder["state"], batch)
        jax.block_until_ready(metrics)

    step_s = median_seconds(one_step, repeats)
    peak_bytes = device_peak_bytes() or compiled.peak_bytes  # what the device allocator really held
    peak = peak_tflops(jax.devices()[0], peak_override)
    mfu = None if not peak or not np.isfinite(compiled.flops) else compiled.flops / step_s / (peak * 1e12 * mesh.size)
    row = {
        "config": name,
        "device": f"{jax.devices()[0].device_kind} x {mesh.size}",
        "dtype": dtype,
        "remat": config.model.get("remat", "-"),
        "views": views,
        "batch": config.batch_size,
        "compile": f"{compiled.compile_s:.1f} s",
        "step": f"{step_s * 1e3:.0f} ms",
        "images/s": f"{config.batch_size / step_s:.1f}",
        "peak mem/device": "n/a" if peak_bytes is None else f"{peak_bytes / 2**30:.2f} GiB",
        "GFLOP/step": f"{compiled.flops / 1e9:.0f}",
        "MFU": "n/a" if mfu is None else f"{100 * mfu:.1f}%",
    }
    if views == "uint8":
        colour_s = colour_seconds(batch, dtype, repeats)
        row.update({"colour chain": f"{colour_s * 1e3:.1f} ms", "colour / step": f"{100 * colour_s / step_s:.1f}%"})
    if profile:
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for _ in range(profile_steps):
                one_step()
        scopes = [f"backbone_{size}" for size, _, _, _ in config.data.crops] + [
            "heads",
            "criterion",
            "optimiser",
            "augment",
        ]
        split = time_split(profile, compiled.fn.as_text(), scopes)
        print(f"\nTime split of {name} ({profile_steps} steps traced in {profile}):\n", flush=True)
        print_table(split)
    if backbone_share:
        share_s, share_compile = backbone_seconds(config, batch_per_device, repeats)
        row.update(
            {
                "backbone share": f"{share_s * 1e3:.0f} ms",
                "step / share": f"{share_s / step_s:.2f}",
                "backbone compile": f"{share_compile:.1f} s",
            }
        )
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="r50,convnext_s")
    parser.add_argument("--batch-per-device", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for the MFU column")
    parser.add_argument(
        "--remat", default=None, choices=("none", "block", "dots"), help="config.model.remat (default: the config's)"
    )
    parser.add_argument("--profile", default=None, metavar="DIR", help="write a trace here and print its time split")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument(
        "--views",
        default="uint8",
        choices=("uint8", "float"),
        help="uint8 views + colour draws (the pipeline's default; colour in the step) or "
        "float views coloured on the host",
    )
    parser.add_argument("--no-backbone-share", dest="backbone_share", action="store_false")
    args = parser.parse_args()
    rows = []
    for name in args.configs.split(","):
        rows.append(
            bench(
                name,
                args.batch_per_device,
                args.dtype,
                args.repeats,
                args.peak_tflops,
                args.remat,
                args.profile and os.path.join(args.profile, name),
                args.profile_steps,
                args.backbone_share,
                args.views,
            )
        )
        print_table(rows)  # after each config: a later one cut by a time limit leaves these rows
        print(flush=True)


if __name__ == "__main__":
    main()
