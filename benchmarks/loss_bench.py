"""Speed and memory of the VICRegL criterion beside a ResNet-50 forward+backward.

    python benchmarks/loss_bench.py [--batch 64] [--repeats 10] [--reference-repeats 3]

Prints one table: for the ResNet-50 setting (2 views of 7x7, local dim 512, expander 8192)
and the ConvNeXt multi-crop setting (2 x 7x7 + 6 x 3x3), the loss's compile time, forward and
forward+backward time (median after a warm-up) and peak memory (XLA's buffer assignment of
the compiled program, common.compiled_peak_bytes), then the same for a ResNet-50
forward+backward over the images those views come from (2 x 224; 2 x 224 + 6 x 96; one
forward pass per view as in training, timed once per crop size and summed), and the loss's
share of it. Timings are medians of wall-clock time on whatever device JAX uses.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from common import compile_jitted, median_seconds, mib
from flax import nnx

from vicregl_jax import losses
from vicregl_jax.models import create_backbone


def timed(fn, args, repeats):
    """Returns (compile seconds, median run seconds, peak bytes) of jax.jit(fn)(*args)."""
    compiled = compile_jitted(jax.jit(fn), *args)
    seconds = median_seconds(lambda: jax.block_until_ready(compiled.fn(*args)), repeats)
    return compiled.compile_s, seconds, compiled.peak_bytes


def loss_inputs(batch, groups, dim=8192, local_dim=512, seed=0):
    """Returns embeddings, local embeddings and grids of the crop groups ((count, grid side), ...)."""
    rng = np.random.default_rng(seed)
    emb = [jnp.asarray(rng.normal(size=(batch, count, dim)), jnp.float32) for count, _ in groups]
    maps = [jnp.asarray(rng.normal(size=(batch, count, n * n, local_dim)), jnp.float32) for count, n in groups]
    grids = []
    for count, n in groups:
        corner = rng.uniform(0, 200, size=(batch, count, 1, 1, 2))
        step = rng.uniform(5, 40, size=(batch, count, 1, 1, 2))
        ij = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1) + 0.5
        grids.append(jnp.asarray(corner + ij * step, jnp.float32))
    return emb, maps, grids


def bench_loss(batch, groups, repeats):
    emb, maps, grids = loss_inputs(batch, groups)
    cfg = losses.LossConfig()

    def forward(emb, maps, grids):
        return losses.vicregl_loss(emb, maps, grids, cfg)[0]

    fwd = timed(forward, (emb, maps, grids), repeats)
    both = timed(jax.value_and_grad(forward, argnums=(0, 1)), (emb, maps, grids), repeats)
    return fwd, both


@functools.cache
def bench_resnet50_view(batch, size, repeats):
    """(compile s, median s, peak bytes) of a ResNet-50 forward+backward (train mode) of one
    batch of views of one size."""
    model = create_backbone("resnet50", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    view = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)

    def loss(params, rest, view):
        net = nnx.merge(graphdef, params, rest, copy=True)
        maps, pooled = net(view)
        return jnp.mean(jnp.square(maps)) + jnp.mean(jnp.square(pooled))

    return timed(jax.grad(loss), (params, rest, view), repeats)


def bench_resnet50(batch, crop_sizes, repeats):
    """Seconds and largest per-view peak of a ResNet-50 forward+backward over one batch of
    views per crop size: each view is its own forward pass in training, so the step's
    backbone time is the sum over views (timed once per size, which also keeps the
    reference's memory to one view's on a small machine)."""
    runs = [bench_resnet50_view(batch, size, repeats) for size in crop_sizes]
    return sum(r[0] for r in runs), sum(r[1] for r in runs), max(r[2] or 0 for r in runs) or None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true", help="time the loss only")
    args = parser.parse_args()

    settings = [
        ("ResNet-50: 2 x 7x7", ((2, 7),), (224, 224), 0.05),
        ("multi-crop: 2 x 7x7 + 6 x 3x3", ((2, 7), (6, 3)), (224, 224) + (96,) * 6, 0.10),
    ]

    print(
        f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, batch {args.batch}, "
        f"expander 8192, local dim 512, median of {args.repeats} (reference {args.reference_repeats})"
    )
    header = (
        "setting",
        "loss compile",
        "loss fwd",
        "loss fwd+bwd",
        "loss peak mem",
        "R50 fwd+bwd",
        "R50 peak mem/view",
        "loss share",
        "target",
    )
    rows = []
    widths = [29] + [max(len(h), 9) for h in header[1:]]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", flush=True)
    for name, groups, crops, target in settings:
        (c_f, t_f, m_f), (c_b, t_b, m_b) = bench_loss(args.batch, groups, args.repeats)
        if args.skip_reference:
            ref = (None, None, None)
            share = "-"
        else:
            ref = bench_resnet50(args.batch, crops, args.reference_repeats)
            share = f"{100 * t_b / ref[1]:.2f}%"
        rows.append(
            (
                name,
                f"{c_b:.1f} s",
                f"{1e3 * t_f:.1f} ms",
                f"{1e3 * t_b:.1f} ms",
                mib(max(m_f or 0, m_b or 0)),
                "-" if ref[1] is None else f"{ref[1]:.2f} s",
                mib(ref[2]),
                share,
                f"< {100 * target:.0f}%",
            )
        )
        print(line(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
