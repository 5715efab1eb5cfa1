"""Checksums of (possibly sharded) arrays, computed on their devices: what a checkpoint's
restore verifies the arrays it reads against (vicregl_jax.checkpoint)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _leaf_name(path) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":  # nnx.Variable's payload
                parts.append(key.name)
        else:
            parts.append(str(key))
    return "/".join(parts)


def _words(x: jax.Array) -> jax.Array:
    """Returns the bits of x as uint32 words: one per element of a 1-, 2- or 4-byte type."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
    """Returns the row-major position of every element of an array of shape, modulo 2**32."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


@jax.jit
def _digest_leaves(leaves):
    # Per leaf: the sum of its 32-bit words and their sum weighted by 2 * position + 1 (odd,
    # so invertible modulo 2**32: any change of one word changes both), in wrapping uint32
    # arithmetic: exact, so equal on any mesh and sharding; and whether it is finite.
    sums, finite = [], []
    for x in leaves:
        words = _words(x)
        weights = _flat_index(words.shape) * jnp.uint32(2) + jnp.uint32(1)
        sums.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)]))
        finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True))
    return jnp.stack(sums), jnp.stack(finite)


def checksums(tree) -> tuple[dict[str, str], list[str]]:
    """Returns ({leaf name: checksum as hex}, [names of the leaves holding NaN or Inf]) of a
    pytree of (possibly sharded) arrays: one jitted pass over them on their devices."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}, []
    names = [_leaf_name(path) for path, _ in flat]
    sums, finite = jax.device_get(_digest_leaves([leaf for _, leaf in flat]))
    return (
        {name: f"{int(a):08x}{int(b):08x}" for name, (a, b) in zip(names, sums)},
        [name for name, ok in zip(names, finite) if not ok],
    )
