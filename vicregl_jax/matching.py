"""Local matching of the VICRegL criterion: for every location of one view its nearest location
in another, by embedding distance or by grid distance, and the best-matched locations kept.

Per example and `jax.vmap`-ed over the batch (`sharding.per_example` runs it where each
device's examples are); ties go to the lower index (the release leaves them to `torch.topk`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vicregl_jax import sharding

# Full float32 precision for the distance matmul: bfloat16 passes (TPU's default) reorder near ties.
_HIGHEST = jax.lax.Precision.HIGHEST


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """Returns the squared Euclidean distances (N_a, N_b) between the rows of a and b."""
    if a.shape[-1] <= 4:  # grid coordinates: exact differences keep ties exact
        return jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)
    cross = jnp.einsum("nd,md->nm", a, b, precision=_HIGHEST)
    sq = jnp.sum(jnp.square(a), -1)[:, None] + jnp.sum(jnp.square(b), -1)[None, :] - 2 * cross
    return jnp.maximum(sq, 0.0)


def nearest_matches(distances: jax.Array, num_matches: int) -> tuple[jax.Array, jax.Array]:
    """Returns (kept, partner) index arrays (num_matches,) for one example's distances (N_a, N_b).

    Every location a has its nearest candidate partner[a] = argmin_b distances[a, b]; the
    num_matches locations with the smallest such distance are kept, in their original order.
    """
    nearest = jnp.argmin(distances, axis=1)
    nearest_dist = jnp.min(distances, axis=1)
    if num_matches == distances.shape[0]:
        kept = jnp.arange(num_matches)
    else:
        _, kept = jax.lax.top_k(-nearest_dist, num_matches)  # ties: lower index first
        kept = jnp.sort(kept)
    return kept, nearest[kept]


def _gather_matches(src, dst, distances, num_matches):
    """Returns (x, y) of shape (B, K, D): kept vectors of src and their matches in dst."""
    nearest = jax.vmap(functools.partial(nearest_matches, num_matches=num_matches))
    kept, partner = sharding.per_example(nearest)(distances)
    take = jax.vmap(lambda m, idx: jnp.take(m, idx, axis=0))
    return take(src, kept), take(dst, partner)


def match_by_embedding(src: jax.Array, dst: jax.Array, num_matches: int):
    """Returns (x, y): the num_matches locations of src (B, N_a, D) closest to dst in embedding
    space and their nearest embeddings in dst (B, N_b, D)."""
    dist = jax.vmap(squared_distances)(jax.lax.stop_gradient(src), jax.lax.stop_gradient(dst))
    return _gather_matches(src, dst, dist, num_matches)


def match_by_location(src, dst, src_grid, dst_grid, num_matches: int):
    """Returns (x, y): the num_matches locations of src whose grid points (B, N_a, 2) lie
    closest to a grid point of dst (B, N_b, 2), and the embeddings at those nearest points."""
    dist = jax.vmap(squared_distances)(jax.lax.stop_gradient(src_grid), jax.lax.stop_gradient(dst_grid))
    return _gather_matches(src, dst, dist, num_matches)
