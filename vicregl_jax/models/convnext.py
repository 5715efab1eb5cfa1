"""ConvNeXt backbones of the release: tiny, small, base, large, xlarge.

Attribute names mirror the release's state_dict (``downsample_layers.{i}.{0,1}``,
``stages.{s}.{b}.{dwconv,norm,pwconv1,pwconv2,gamma}``, ``norm``). The release returns
the last stage's map flattened with the final LayerNorm applied to every location, and
the mean of that normalised map as the pooled representation (not norm of the mean).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vicregl_jax.models.layers import LayerNorm, convnext_normal, drop_path

LAYERNORM_EPS = 1e-6


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, *,
          groups: int = 1, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """Returns a conv with bias, ConvNeXt init and explicit symmetric padding."""
    return nnx.Conv(
        in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
        padding=((padding, padding), (padding, padding)), feature_group_count=groups,
        use_bias=True, kernel_init=convnext_normal, bias_init=nnx.initializers.zeros,
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _linear(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, kernel_init=convnext_normal,
                      bias_init=nnx.initializers.zeros, dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs)


class ConvNeXtBlock(nnx.Module):
    """7x7 depthwise conv, LayerNorm, Linear 4x, exact GELU, Linear, [gamma], drop path."""

    def __init__(self, dim: int, *, drop_path_rate: float, layer_scale_init: float,
                 dtype, rngs: nnx.Rngs):
        self.dwconv = _conv(dim, dim, 7, 1, 3, groups=dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, epsilon=LAYERNORM_EPS, dtype=dtype)
        self.pwconv1 = _linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
        self.pwconv2 = _linear(4 * dim, dim, dtype=dtype, rngs=rngs)
        # Layer scale as the release: a learnable per-channel gamma only when init > 0.
        self.gamma = (nnx.Param(jnp.full((dim,), layer_scale_init, jnp.float32))
                      if layer_scale_init > 0 else nnx.data(None))
        self.drop_path = drop_path(drop_path_rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.norm(self.dwconv(x))
        y = self.pwconv2(jax.nn.gelu(self.pwconv1(y), approximate=False))
        if self.gamma is not None:
            y = y * self.gamma[...].astype(y.dtype)
        if self.drop_path is not None:
            y = self.drop_path(y)
        return x + y


class ConvNeXt(nnx.Module):
    """ConvNeXt backbone: NHWC images -> (maps (B, h*w, C), pooled (B, C)), both float32.

    Args:
      depths: blocks per stage; dims: channels per stage (4 stages, total stride 32).
      drop_path_rate: stochastic depth of the last block, linear from 0 over all blocks.
      layer_scale_init: initial gamma; 0 (the release's default) means no gamma.
      dtype: compute dtype (parameters and LayerNorm statistics stay float32).
    """

    def __init__(self, *, depths: Sequence[int], dims: Sequence[int],
                 drop_path_rate: float = 0.1, layer_scale_init: float = 0.0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths={tuple(depths)}, dims={tuple(dims)}: give 4 stages each")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={drop_path_rate}: use a value in [0, 1)")
        self.dtype = dtype
        downsample_layers = [nnx.List([
            _conv(3, dims[0], 4, 4, 0, dtype=dtype, rngs=rngs),
            LayerNorm(dims[0], epsilon=LAYERNORM_EPS, dtype=dtype)])]
        for i in range(3):
            downsample_layers.append(nnx.List([
                LayerNorm(dims[i], epsilon=LAYERNORM_EPS, dtype=dtype),
                _conv(dims[i], dims[i + 1], 2, 2, 0, dtype=dtype, rngs=rngs)]))
        self.downsample_layers = nnx.List(downsample_layers)
        total = sum(depths)
        # Drop path rate of each block: linear from 0 to drop_path_rate over all blocks.
        rates = [float(r) for r in np.linspace(0.0, drop_path_rate, total)]
        stages, k = [], 0
        for depth, dim in zip(depths, dims):
            stages.append(nnx.List([
                ConvNeXtBlock(dim, drop_path_rate=rates[k + j],
                              layer_scale_init=layer_scale_init, dtype=dtype, rngs=rngs)
                for j in range(depth)]))
            k += depth
        self.stages = nnx.List(stages)
        self.norm = LayerNorm(dims[-1], epsilon=LAYERNORM_EPS, dtype=jnp.float32)
        self.num_features = dims[-1]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.astype(self.dtype)
        for downsample, stage in zip(self.downsample_layers, self.stages):
            for layer in downsample:
                x = layer(x)
            for block in stage:
                x = block(x)
        b, h, w, c = x.shape
        maps = self.norm(x.reshape(b, h * w, c))
        return maps, jnp.mean(maps, axis=1)
