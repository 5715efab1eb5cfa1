"""Forward + backward speed and memory of the backbones, beside the PyTorch reference.

    python benchmarks/model_bench.py                                   # CPU: batch 8, f32
    python benchmarks/model_bench.py --dtype bfloat16 --batch 256      # GPU / TPU

For each architecture, one training step of the backbone alone (train mode, loss =
mean(pooled^2) + mean(maps^2), gradients of every parameter) is compiled, warmed up and
timed; the PyTorch reference module of references/torch_modules.py (the release's layout)
runs the same step at the same batch in the same process. Columns:

  img/s      images per second (median step time over --steps)
  peak MiB   JAX: on GPU/TPU the device's peak bytes in use; on CPU XLA's buffer
             assignment of the compiled step (arguments + outputs + temporaries).
             PyTorch: on CUDA torch.cuda.max_memory_allocated; on CPU parameters +
             gradients + the tensors autograd saves for the backward pass.
  GFLOP/img  forward + backward FLOPs per image, from XLA's cost analysis of the lowered step.
  MFU        model FLOP utilisation: those FLOPs per second over the device's peak
             (bfloat16 dense peak of known accelerators, or --peak-tflops).
  ratio      JAX img/s over PyTorch img/s.

On CPU a third row uses ConvNeXt's "shifted" depthwise convs (see
vicregl_jax/models/convnext.py): XLA:CPU computes the kernel gradient of grouped
convolutions as a dense convolution.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from common import compile_jitted, device_peak_bytes, median_seconds, peak_tflops
from flax import nnx

from vicregl_jax.models import create_backbone


def bench_jax(arch: str, batch: int, size: int, dtype, steps: int) -> dict:
    """Returns img/s, peak bytes and FLOPs of one jitted forward+backward of arch.

    "convnext_small:shifted" builds the ConvNeXt with depthwise="shifted" (CPU-friendly).
    """
    name, _, depthwise = arch.partition(":")
    kwargs = {"depthwise": depthwise} if depthwise else {}
    model = nnx.jit(lambda: create_backbone(name, dtype=dtype, rngs=nnx.Rngs(0), **kwargs))()
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)

    @jax.jit
    def step(params, rest, x):
        def loss(params):
            # copy=True: fresh Variables of this trace, so BatchNorm can update its stats.
            model = nnx.merge(graphdef, params, rest, copy=True)
            maps, pooled = model(x)
            value = jnp.mean(jnp.square(pooled)) + jnp.mean(jnp.square(maps))
            return value, nnx.state(model, nnx.Not(nnx.Param))  # updated batch statistics

        (value, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, grads, new_rest

    compiled = compile_jitted(step, params, rest, x)
    seconds = median_seconds(lambda: jax.block_until_ready(compiled.fn(params, rest, x)), steps, warmup=2)
    peak = device_peak_bytes() or compiled.peak_bytes
    return {"img_s": batch / seconds, "peak": peak, "flops": compiled.flops, "seconds": seconds}


def bench_torch(arch: str, batch: int, size: int, dtype, steps: int) -> dict | None:
    """Returns img/s and peak bytes of the PyTorch reference's forward+backward."""
    try:
        import torch

        from references.torch_modules import TORCH_BACKBONES
    except ImportError:
        return None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = TORCH_BACKBONES[arch.partition(":")[0]]().to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == jnp.bfloat16)
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step():
        model.zero_grad(set_to_none=True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            maps, pooled = model(x)
            loss = pooled.float().square().mean() + maps.float().square().mean()
        activations = sum(saved.values())
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return activations

    activations = step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, steps)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        peak = 2 * weights + activations
    return {"img_s": batch / seconds, "peak": peak, "seconds": seconds}


def main() -> None:
    """Runs the benchmark and prints one table row per architecture."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--archs", nargs="+", default=None, help="default: resnet50 convnext_small (+ convnext_small:shifted on CPU)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak TFLOP/s for MFU (default: known accelerators)"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    if args.archs is None:
        args.archs = ["resnet50", "convnext_small"] + (["convnext_small:shifted"] if device.platform == "cpu" else [])
    peak = peak_tflops(device, args.peak_tflops)
    print(
        f"device: {device.device_kind} ({jax.device_count()} devices, using 1); "
        f"batch {args.batch}, {args.size}px, compute {args.dtype}, median of {args.steps} steps"
    )
    header = (
        f"| {'arch':22s} | {'JAX img/s':>9s} | {'JAX peak MiB':>12s} | {'GFLOP/img':>9s} | "
        f"{'MFU':>6s} | {'torch img/s':>11s} | {'torch peak MiB':>14s} | {'ratio':>5s} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for arch in args.archs:
        j = bench_jax(arch, args.batch, args.size, dtype, args.steps)
        t = None if args.no_torch else bench_torch(arch, args.batch, args.size, dtype, args.steps)
        mfu = (
            f"{j['flops'] / j['seconds'] / (peak * 1e12):6.1%}" if peak and np.isfinite(j["flops"]) else f"{'n/a':>6s}"
        )
        torch_cols = (
            f"{t['img_s']:11.1f} | {t['peak'] / 2**20:14.0f} | {j['img_s'] / t['img_s']:5.2f}"
            if t
            else f"{'-':>11s} | {'-':>14s} | {'-':>5s}"
        )
        print(
            f"| {arch:22s} | {j['img_s']:9.1f} | {j['peak'] / 2**20:12.0f} | "
            f"{j['flops'] / args.batch / 1e9:9.1f} | {mfu} | {torch_cols} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
