"""ConvNeXt backbones of the release: tiny, small, base, large, xlarge.

Attribute names mirror the release's state_dict (``downsample_layers.{i}.{0,1}``,
``stages.{s}.{b}.{dwconv,norm,pwconv1,pwconv2,gamma}``, ``norm``); a stage of 2 or more
blocks is one BlockStack (``stages.{s}.0.stacked.*`` with a leading block axis, run by a
scan), which layout.py maps to the release's per-block names. The release returns the last
stage's map flattened with the final LayerNorm applied to every location, and the mean of
that normalised map as the pooled representation (not norm of the mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vicregl_jax import sharding
from vicregl_jax.models.layers import LayerNorm, convnext_normal, drop_path
from vicregl_jax.models.stack import check_remat, run_stage, stage_blocks

LAYERNORM_EPS = 1e-6


def _init_and_dtypes(dtype) -> dict:
    """Returns the keyword arguments shared by ConvNeXt's convs and linears: its init, float32 params."""
    return dict(kernel_init=convnext_normal, bias_init=nnx.initializers.zeros, dtype=dtype, param_dtype=jnp.float32)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """Returns a non-overlapping (kernel == stride, no padding) conv with ConvNeXt init."""
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=(stride, stride),
        padding="VALID",
        use_bias=True,
        conv_general_dilated=sharding.gathered_conv_general_dilated,
        rngs=rngs,
        **_init_and_dtypes(dtype),
    )


def _linear(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """Returns a linear layer with ConvNeXt init and an FSDP-gathered kernel."""
    return nnx.Linear(
        in_features,
        out_features,
        dot_general=sharding.gathered_dot_general,
        rngs=rngs,
        **_init_and_dtypes(dtype),
    )


class DepthwiseConv(nnx.Module):
    """k x k depthwise conv with bias and padding k // 2; kernel (k, k, 1, C) as nnx.Conv's.

    implementation "grouped" (the default) is a convolution with feature_group_count = C,
    which cuDNN and TPUs run natively. XLA:CPU lowers the kernel gradient of that
    convolution to a dense one (C times the FLOPs) and is slow even forward; "shifted"
    writes the same sum as k*k shifted multiply-adds (accumulated in float32), which XLA
    fuses: ConvNeXt-S steps 2-4x faster on CPU, but slower to compile (~2 s more per
    block for forward + backward) and with ~2.5x the peak memory (XLA materialises the
    shifted copies in the backward pass). For long runs on CPU only.
    """

    def __init__(self, channels: int, kernel_size: int, *, dtype, rngs: nnx.Rngs, implementation: str = "grouped"):
        if implementation not in ("grouped", "shifted"):
            raise ValueError(f"depthwise implementation {implementation!r}: use 'grouped' or 'shifted'")
        shape = (kernel_size, kernel_size, 1, channels)
        self.kernel = nnx.Param(convnext_normal(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.kernel_size = kernel_size
        self.dtype = dtype
        self.implementation = implementation

    def __call__(self, x: jax.Array) -> jax.Array:
        k, pad = self.kernel_size, self.kernel_size // 2
        x = x.astype(self.dtype)
        if self.implementation == "grouped":
            y = sharding.gathered_conv_general_dilated(
                x,
                self.kernel[...].astype(self.dtype),
                (1, 1),
                ((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=x.shape[-1],
            )
        else:
            h, w = x.shape[1:3]
            padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            kernel = self.kernel[...].astype(self.dtype)
            y = sum(
                padded[:, i : i + h, j : j + w, :].astype(jnp.float32) * kernel[i, j, 0]
                for i in range(k)
                for j in range(k)
            )
        return (y + self.bias[...]).astype(self.dtype)


class ConvNeXtBlock(nnx.Module):
    """7x7 depthwise conv, LayerNorm, Linear 4x, exact GELU, Linear, [gamma], drop path."""

    def __init__(
        self,
        dim: int,
        *,
        drop_path_rate: float,
        layer_scale_init: float,
        depthwise: str = "grouped",
        dtype,
        rngs: nnx.Rngs,
    ):
        self.dwconv = DepthwiseConv(dim, 7, dtype=dtype, rngs=rngs, implementation=depthwise)
        self.norm = LayerNorm(dim, epsilon=LAYERNORM_EPS, dtype=dtype)
        self.pwconv1 = _linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
        self.pwconv2 = _linear(4 * dim, dim, dtype=dtype, rngs=rngs)
        # Layer scale as the release: a learnable per-channel gamma only when init > 0.
        self.gamma = (
            nnx.Param(jnp.full((dim,), layer_scale_init, jnp.float32)) if layer_scale_init > 0 else nnx.data(None)
        )
        self.drop_path = drop_path(drop_path_rate, rngs=rngs)

    def __call__(self, x: jax.Array, drop_path=None) -> jax.Array:
        """Returns x + the residual branch; drop_path (a function) overrides the block's own."""
        y = self.norm(self.dwconv(x))
        y = self.pwconv2(jax.nn.gelu(self.pwconv1(y), approximate=False))
        if self.gamma is not None:
            y = y * self.gamma[...].astype(y.dtype)
        drop_path = drop_path or self.drop_path
        if drop_path is not None:
            y = drop_path(y)
        return x + y


class ConvNeXt(nnx.Module):
    """ConvNeXt backbone: NHWC images -> (maps (B, h*w, C), pooled (B, C)), both float32.

    Args:
      depths: blocks per stage; dims: channels per stage (4 stages, total stride 32).
      drop_path_rate: stochastic depth of the last block, linear from 0 over all blocks.
      layer_scale_init: initial gamma; 0 (the release's default) means no gamma.
      depthwise: "grouped" or "shifted" 7x7 depthwise convs (see DepthwiseConv; "shifted"
        only for long runs on CPU).
      dtype: compute dtype (parameters and LayerNorm statistics stay float32).
      remat: rematerialisation per block, "dots" (default) | "block" | "none" (models/stack.py).
      scan: run a stage's blocks as one scan (BlockStack); False unrolls them (same
        function, other parameter tree; for comparisons).
      unroll: run the scans unrolled (same parameters); None: on CPU only (models/stack.py).
    """

    def __init__(
        self,
        *,
        depths: Sequence[int],
        dims: Sequence[int],
        drop_path_rate: float = 0.1,
        layer_scale_init: float = 0.0,
        depthwise: str = "grouped",
        dtype=jnp.float32,
        remat: str = "dots",
        scan: bool = True,
        unroll: bool | None = None,
        rngs: nnx.Rngs,
    ):
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths={tuple(depths)}, dims={tuple(dims)}: give 4 stages each")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={drop_path_rate}: use a value in [0, 1)")
        self.dtype = dtype
        self.remat = check_remat(remat)
        downsample_layers = [
            nnx.List(
                [
                    _conv(3, dims[0], 4, 4, dtype=dtype, rngs=rngs),
                    LayerNorm(dims[0], epsilon=LAYERNORM_EPS, dtype=dtype),
                ]
            )
        ]
        for i in range(3):
            downsample_layers.append(
                nnx.List(
                    [
                        LayerNorm(dims[i], epsilon=LAYERNORM_EPS, dtype=dtype),
                        _conv(dims[i], dims[i + 1], 2, 2, dtype=dtype, rngs=rngs),
                    ]
                )
            )
        self.downsample_layers = nnx.List(downsample_layers)
        total = sum(depths)
        # Drop path rate of each block: linear from 0 to drop_path_rate over all blocks.
        rates = [float(r) for r in np.linspace(0.0, drop_path_rate, total)]
        stages, k = [], 0
        for depth, dim in zip(depths, dims):

            def make_block(rngs, rate, dim=dim):
                return ConvNeXtBlock(
                    dim,
                    drop_path_rate=rate,
                    layer_scale_init=layer_scale_init,
                    depthwise=depthwise,
                    dtype=dtype,
                    rngs=rngs,
                )

            stages.append(
                nnx.List(
                    stage_blocks(
                        make_block,
                        depth,
                        rngs=rngs,
                        scan=scan,
                        drop_path_rates=rates[k : k + depth],
                        remat=remat,
                        unroll=unroll,
                    )
                )
            )
            k += depth
        self.stages = nnx.List(stages)
        self.norm = LayerNorm(dims[-1], epsilon=LAYERNORM_EPS, dtype=jnp.float32)
        self.stage_channels = tuple(dims)
        self.num_features = dims[-1]

    def stage_maps(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Returns the 4 stages' outputs (strides 4, 8, 16, 32), NHWC in the compute dtype,
        without the final LayerNorm (what the release's segmentation heads read)."""
        x = x.astype(self.dtype)
        outputs = []
        for downsample, stage in zip(self.downsample_layers, self.stages):
            for layer in downsample:
                x = layer(x)
            x = run_stage(stage, sharding.constrain_batch(x), self.remat)
            outputs.append(x)
        return tuple(outputs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.stage_maps(x)[-1]
        b, h, w, c = x.shape
        maps = self.norm(x.reshape(b, h * w, c))
        return maps, jnp.mean(maps, axis=1)
