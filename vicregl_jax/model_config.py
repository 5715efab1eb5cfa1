"""The model a config describes: VICRegLModel built from config.model (and loss.alpha, which
decides the heads), for real or as shapes only, and the keys that define its state's shapes.

The functions take the config's model section and alpha, not the whole config; only
`model_meta` reads across sections (the shape-defining keys of a checkpoint).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vicregl_jax.models.vicregl import VICRegLModel

# The config keys that define the shapes of the state: a checkpoint written under other
# values cannot be restored into this run.
MODEL_KEYS = (
    "model.arch",
    "model.mlp",
    "model.maps_mlp",
    "model.num_classes",
    "model.layer_scale_init",
    "loss.alpha",
    "optim.name",
)
# The keys of config.model that change how the model computes, not what it holds: an
# evaluation takes them from its own config whatever wrote the weights.
COMPUTE_KEYS = ("dtype", "remat", "unroll_blocks")


def compute_dtype(name: str) -> jnp.dtype:
    """Returns the compute dtype of config.model.dtype: for "auto", bfloat16 on GPU / TPU and
    float32 on CPU."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype={name!r}: use 'auto', 'float32' or 'bfloat16'.")
    return jnp.dtype(name)


def model_kwargs(model: ml_collections.ConfigDict, alpha: float) -> dict:
    """Returns the VICRegLModel keyword arguments of a config's model section and loss.alpha."""
    return dict(
        arch=model.arch,
        mlp=model.mlp,
        maps_mlp=model.maps_mlp,
        alpha=alpha,
        num_classes=model.num_classes,
        dtype=compute_dtype(model.dtype),
        drop_path_rate=model.drop_path_rate,
        layer_scale_init=model.layer_scale_init,
        remat=model.remat,
        unroll_blocks=model.unroll_blocks,
    )


def with_compute(
    model: ml_collections.ConfigDict, compute: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
    """Returns a copy of the model section with COMPUTE_KEYS taken from `compute` (another
    config's model section; None keeps them)."""
    out = ml_collections.ConfigDict(model.to_dict())
    if compute is not None:
        for key in COMPUTE_KEYS:
            out[key] = compute[key]
    return out


def create_model(model: ml_collections.ConfigDict, alpha: float, *, rngs: nnx.Rngs) -> VICRegLModel:
    """Returns the VICRegL model (backbone + heads) of a model section, in train mode."""
    built = VICRegLModel(**model_kwargs(model, alpha), rngs=rngs)
    built.train()
    return built


def abstract_model(model: ml_collections.ConfigDict, alpha: float, seed: int = 0) -> VICRegLModel:
    """Returns the model section's model built with nnx.eval_shape: shapes only, nothing allocated."""
    return nnx.eval_shape(lambda: create_model(model, alpha, rngs=nnx.Rngs(seed)))


def split_model(model: nnx.Module):
    """Returns (graphdef, params, batch_stats, rest): rest holds the drop-path random streams."""
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def seed_random_streams(model: nnx.Module, key: jax.Array) -> None:
    """Gives the model's random streams (drop path) fresh keys derived from key, in place."""
    nnx.reseed(model, default=key)


def model_meta(config) -> dict:
    """Returns the shape-defining part of a whole config (MODEL_KEYS) as a JSON-friendly dict."""
    out = {}
    for dotted in MODEL_KEYS:
        value = config
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, (dict, ml_collections.ConfigDict)) else None
        out[dotted] = value
    return out
