"""Heads: the expander / local projector MLPs and the online linear classifier.

As the release's ``utils.MLP``: for a spec "8192-8192-8192" on C input features,
Linear(C, 8192), Norm, ReLU, Linear(8192, 8192), Norm, ReLU, Linear(8192, 8192, no bias),
with torch.nn.Linear's default initialisation. Norm is BatchNorm1d after ResNets and
torch.nn.LayerNorm after ConvNeXts, both with PyTorch's default eps 1e-5 (the ConvNeXt
backbone's own LayerNorms use 1e-6; the heads' do not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vicregl_jax.models.layers import BatchNorm, LayerNorm, torch_linear

HEAD_NORM_EPS = 1e-5


def parse_mlp_spec(spec: str) -> tuple[int, ...]:
    """Returns the layer widths of an MLP spec string such as "8192-8192-8192"."""
    try:
        dims = tuple(int(d) for d in str(spec).split("-"))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"MLP spec {spec!r}: use positive widths joined by '-', e.g. '8192-8192-8192'")
    return dims


class MLP(nnx.Module):
    """Linear/Norm/ReLU layers then a bias-free Linear, on the last axis of any input.

    BatchNorm statistics are over every leading axis, so a (B, N, C) input is normalised
    over all B*N vectors. ``linears[i]`` / ``norms[i]`` are the release's Sequential
    indices 3*i / 3*i + 1.
    """

    def __init__(self, in_features: int, spec: str, *, norm: str, dtype=jnp.float32, rngs: nnx.Rngs):
        if norm not in ("batch", "layer"):
            raise ValueError(f"norm={norm!r}: use 'batch' (ResNet) or 'layer' (ConvNeXt)")
        dims = (in_features, *parse_mlp_spec(spec))
        last = len(dims) - 2
        self.linears = nnx.List(
            [
                torch_linear(dims[i], dims[i + 1], use_bias=i < last, dtype=dtype, rngs=rngs)
                for i in range(len(dims) - 1)
            ]
        )
        make_norm = (
            (lambda d: BatchNorm(d, epsilon=HEAD_NORM_EPS, dtype=dtype))
            if norm == "batch"
            else (lambda d: LayerNorm(d, epsilon=HEAD_NORM_EPS, dtype=dtype))
        )
        self.norms = nnx.List([make_norm(d) for d in dims[1:-1]])
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for linear, norm in zip(self.linears, self.norms):
            x = nnx.relu(norm(linear(x)))
        return self.linears[-1](x)


def linear_classifier(in_features: int, num_classes: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """Returns the online classifier: torch.nn.Linear(in_features, num_classes)."""
    if num_classes <= 0:
        raise ValueError(f"num_classes={num_classes}: use a positive number of classes")
    return torch_linear(in_features, num_classes, dtype=dtype, rngs=rngs)
