"""Building blocks shared by the backbones and heads, with PyTorch's numerics.

The normalisation layers here compute their statistics and the normalisation itself in
float32 whatever the compute dtype (as PyTorch autocast does), and use the two-pass
variance E[(x - E[x])^2] rather than E[x^2] - E[x]^2, so that converted PyTorch weights
give the same outputs to float32 round-off.

LayerNorm has its own backward pass (`layer_norm`, a custom_vjp): it keeps its input in the
compute dtype and two float32 numbers per row (mean, reciprocal std) for the backward pass,
where automatic differentiation of the float32 computation would keep float32 copies of the
whole input.

Mode switching: BatchNorm has a ``use_running_average`` attribute and drop path (DropPath, a
per-sample mask) a ``deterministic`` one, so ``model.train()`` / ``model.eval()`` (in place)
and ``nnx.view(model, use_running_average=..., deterministic=...)`` (a new view sharing the
arrays) both work.

Linear and conv layers made here compute through vicregl_jax.sharding's gathered operations:
the plain ones, except when a train step traces them with FSDP-sharded weights.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vicregl_jax import sharding

# PyTorch BatchNorm momentum 0.1 (weight of the new batch) is a decay of 0.9 here.
BATCHNORM_MOMENTUM = 0.9
BATCHNORM_EPS = 1e-5

# Initialisers. Each draws its values as a flat vector and reshapes it: the result is the
# same distribution, and XLA:CPU compiles threefry on N-d shapes (the default
# jax_threefry_partitionable) orders of magnitude more slowly than on 1-d ones.


def _fans(shape) -> tuple[int, int]:
    """Returns (fan_in, fan_out) of a Dense (in, out) or conv (kh, kw, in, out) kernel."""
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _normal(key, shape, dtype, std):
    return std * jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def _uniform(key, shape, dtype, bound):
    return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
    """torchvision ResNet convs: N(0, 2 / fan_out), fan_out = out * kh * kw (not truncated)."""
    return _normal(key, shape, dtype, math.sqrt(2.0 / _fans(shape)[1]))


def convnext_normal(key, shape, dtype=jnp.float32):
    """ConvNeXt convs and linears: N(0, 0.02^2).

    The release's timm trunc_normal_(std=0.02) truncates at +-2 in absolute value, i.e. at
    100 standard deviations: a plain normal.
    """
    return _normal(key, shape, dtype, 0.02)


def torch_linear_kernel_init(key, shape, dtype=jnp.float32):
    """torch.nn.Linear's default weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return _uniform(key, shape, dtype, 1.0 / math.sqrt(_fans(shape)[0]))


def torch_linear_bias_init(fan_in: int):
    """Returns an initialiser drawing a bias like torch.nn.Linear: U(+-1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        return _uniform(key, shape, dtype, 1.0 / math.sqrt(fan_in))

    return init


def torch_linear(
    in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs
) -> nnx.Linear:
    """Returns an nnx.Linear initialised as torch.nn.Linear's default, float32 params."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=torch_linear_kernel_init,
        bias_init=torch_linear_bias_init(in_features),
        dtype=dtype,
        param_dtype=jnp.float32,
        dot_general=sharding.gathered_dot_general,
        rngs=rngs,
    )


def _mean_and_variance(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Returns the float32 mean and biased variance of x over axes (two passes)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - jnp.expand_dims(mean, axes)), axis=axes)
    return mean, var


class BatchNorm(nnx.Module):
    """BatchNorm over every axis but the last, matching torch.nn.BatchNorm{1,2}d.

    In training mode the batch statistics are plain means over the (global) array, so
    under ``jax.jit`` with a batch sharded over a mesh they are global with no
    ``axis_name``. As in PyTorch the running variance is updated with the unbiased batch
    variance (n / (n - 1)) while the normalisation uses the biased one.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = BATCHNORM_MOMENTUM,
        epsilon: float = BATCHNORM_EPS,
        zero_init_scale: bool = False,
        use_running_average: bool = False,
        dtype=jnp.float32,
    ):
        self.scale = nnx.Param((jnp.zeros if zero_init_scale else jnp.ones)((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.dtype = dtype

    def set_view(self, use_running_average: bool | None = None):
        """Used by nnx.view: True normalises with the running statistics."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var = _mean_and_variance(x, axes)
            n = math.prod(x.shape[:-1])
            unbiased_var = var * (n / (n - 1)) if n > 1 else var
            m = self.momentum
            self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
            self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * unbiased_var)
        mul = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
        y = (x.astype(jnp.float32) - mean) * mul + self.bias[...]
        return y.astype(self.dtype)


def _layer_norm_forward(x, scale, bias, epsilon, dtype):
    mean, var = _mean_and_variance(x, (x.ndim - 1,))
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x.astype(jnp.float32) - mean[..., None]) * rstd[..., None]
    return (y * scale + bias).astype(dtype), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype) -> jax.Array:
    """Returns x normalised over its last axis (float32 statistics), times scale plus bias, in dtype.

    The backward pass keeps x as given (e.g. bfloat16) and the float32 mean and reciprocal
    std of each row, and recomputes the normalised rows from them.
    """
    return _layer_norm_forward(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
    y, (mean, rstd) = _layer_norm_forward(x, scale, bias, epsilon, dtype)
    return y, (x, mean, rstd, scale)


def _layer_norm_bwd(epsilon, dtype, residuals, grad):
    x, mean, rstd, scale = residuals
    rstd = rstd[..., None]
    normalised = (x.astype(jnp.float32) - mean[..., None]) * rstd
    grad = grad.astype(jnp.float32)
    rows = tuple(range(x.ndim - 1))
    grad_scale = jnp.sum(grad * normalised, axis=rows)
    grad_bias = jnp.sum(grad, axis=rows)
    g = grad * scale
    # d/dx of (x - mean) * rstd: g minus its row mean, minus the normalised row times the row
    # mean of g * normalised, all times rstd.
    grad_x = rstd * (
        g - jnp.mean(g, axis=-1, keepdims=True) - normalised * jnp.mean(g * normalised, axis=-1, keepdims=True)
    )
    return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (torch.nn.LayerNorm / ConvNeXt's channels-first one)."""

    def __init__(self, num_features: int, *, epsilon: float, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.epsilon, jnp.dtype(self.dtype))


def drop_samples(x: jax.Array, rate, key: jax.Array) -> jax.Array:
    """Returns x with whole samples (axis 0) zeroed with probability rate and the others
    scaled by 1 / (1 - rate); rate may be a traced scalar (a scanned block's rate)."""
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


class DropPath(nnx.Module):
    """Stochastic depth as timm's DropPath: drops whole samples of a residual branch.

    Draws from the 'dropout' stream of the Rngs it is given (or 'default'), one key per call;
    off after ``model.eval()`` (``deterministic``). A scan over blocks (BlockStack) uses one
    DropPath for its stream and passes each block's rate and key to ``drop_samples``.
    """

    def __init__(self, rate: float, *, rngs: nnx.Rngs, deterministic: bool = False):
        self.rate = rate
        self.deterministic = deterministic
        self.rngs = rngs["dropout"].fork()

    def set_view(self, deterministic: bool | None = None):
        """Used by nnx.view: True turns drop path off."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic:
            return x
        return drop_samples(x, self.rate, self.rngs())


def drop_path(rate: float, *, rngs: nnx.Rngs) -> DropPath | None:
    """Returns stochastic depth for residual branches (None when rate is 0)."""
    if rate <= 0.0:
        return None
    return DropPath(rate, rngs=rngs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """Returns the 3x3 / stride 2 max-pool with PyTorch's symmetric padding of 1."""
    # A Python -inf with lax.max is recognised as the max monoid (differentiable).
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
