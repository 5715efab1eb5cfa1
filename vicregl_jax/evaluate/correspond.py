"""Dense correspondence accuracy under known geometry: what the local loss asks for, measured.

For two random crops of one image, every location of view A whose centre falls inside view B
looks for its nearest neighbour (Euclidean distance of the local features) among B's
locations. It is correct when that neighbour lies within one grid cell (Chebyshev distance in
B's grid) of the cell that truly shows A's centre. Grids must come with flip_grid=True so that
a flipped view's cells point at the pixels they show. Needs no labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def true_cells(points: jax.Array, grid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (cell index (P, 2) in grid (n, n, 2), inside mask (P,)) for points (P, 2) in pixels.

    The grid's cell centres are evenly spaced (possibly decreasing along columns when the view
    was flipped); a point is inside when it lies within half a cell of the outermost centres.
    """
    n = grid.shape[0]
    origin = grid[0, 0]
    step = jnp.stack([grid[1, 0, 0] - grid[0, 0, 0], grid[0, 1, 1] - grid[0, 0, 1]])  # (drow, dcol)
    position = (points - origin) / step  # fractional (row, col) cell coordinates
    index = jnp.round(position).astype(jnp.int32)
    inside = jnp.all((position >= -0.5) & (position <= n - 0.5), axis=-1)
    return jnp.clip(index, 0, n - 1), inside


def correspondence_counts(feat_a, feat_b, grid_a, grid_b) -> tuple[jax.Array, jax.Array]:
    """Returns (correct, valid) counts over a batch: feat (B, N, C), grid (B, n, n, 2)."""
    if grid_a.shape[1] < 2 or grid_b.shape[1] < 2:
        raise ValueError(f"Correspondence needs grids of at least 2 x 2 cells; got {grid_a.shape} and {grid_b.shape}.")

    def one(fa, fb, ga, gb):
        nb = gb.shape[0]
        points = ga.reshape(-1, 2)
        cells, inside = true_cells(points, gb)
        fa, fb = fa.astype(jnp.float32), fb.astype(jnp.float32)
        d = jnp.sum(fa**2, -1)[:, None] + jnp.sum(fb**2, -1)[None, :] - 2 * fa @ fb.T
        nearest = jnp.argmin(d, axis=1)
        predicted = jnp.stack([nearest // nb, nearest % nb], axis=-1)
        ok = jnp.max(jnp.abs(predicted - cells), axis=-1) <= 1
        return jnp.sum(ok & inside), jnp.sum(inside)

    correct, valid = jax.vmap(one)(feat_a, feat_b, grid_a, grid_b)
    return jnp.sum(correct), jnp.sum(valid)
