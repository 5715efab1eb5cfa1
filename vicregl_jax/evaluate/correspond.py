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

from vicregl_jax import data as data_lib
from vicregl_jax import models
from vicregl_jax.evaluate import common
from vicregl_jax.matching import squared_distances


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


def nearest_cell_matches(feat_a, feat_b, grid_a, grid_b):
    """Returns, for one pair of views, (nearest (N_a,): index of the nearest location of B by
    feature distance, correct (N_a,): within one cell of the true cell, inside (N_a,): A's
    centre lies in B, near (N_a,): how many of B's cells count as correct, over N_b).

    feat (N, C), grid (n, n, 2); the one-cell test is the Chebyshev distance <= 1 in B's grid.
    """
    nb = grid_b.shape[0]
    cells, inside = true_cells(grid_a.reshape(-1, 2), grid_b)
    nearest = jnp.argmin(squared_distances(feat_a.astype(jnp.float32), feat_b.astype(jnp.float32)), axis=1)
    predicted = jnp.stack([nearest // nb, nearest % nb], axis=-1)
    correct = jnp.max(jnp.abs(predicted - cells), axis=-1) <= 1
    near = (jnp.minimum(cells + 1, nb - 1) - jnp.maximum(cells - 1, 0) + 1).prod(axis=-1) / nb**2
    return nearest, correct, inside, near


def correspondence_counts(feat_a, feat_b, grid_a, grid_b) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (correct, valid, chance) over a batch: feat (B, N, C), grid (B, n, n, 2).

    chance is the expected number correct when the neighbour is drawn uniformly from B's
    cells: the count of cells within one of the true cell, over nb^2, summed over valid cells.
    """
    if grid_a.shape[1] < 2 or grid_b.shape[1] < 2:
        raise ValueError(f"Correspondence needs grids of at least 2 x 2 cells; got {grid_a.shape} and {grid_b.shape}.")
    _, correct, inside, near = jax.vmap(nearest_cell_matches)(feat_a, feat_b, grid_a, grid_b)
    return jnp.sum(correct & inside), jnp.sum(inside), jnp.sum(jnp.where(inside, near, 0.0))


def run(
    config, workdir, weights=None, *, random_init: bool = False, name: str = "correspond", check: bool = True
) -> dict:
    """Measures correspondence accuracy of the frozen backbone's maps on pairs of random crops
    of config.data.dataset (no colour augmentation, flips with corrected grids). check: run
    the config check first (main.py has run it)."""
    settings = config.eval.correspond
    mesh, loaded, feature_fn, batch_size = common.start(
        config, workdir, weights, "correspond", random_init=random_init, check=check
    )
    group = data_lib.CropGroup(settings.crop_size, 2, tuple(settings.scale))
    iterator = data_lib.make_pretrain_iterator(
        config.data.dataset,
        config.data.split,
        groups=[group],
        global_batch_size=batch_size,
        seed=config.seed + 1,
        stride=models.backbone_stride(loaded.arch),
        flip_grid=True,
        with_labels=False,
        colour="none",
        read=data_lib.ReadOptions.from_config(config.data),
    )
    counts = jax.jit(correspondence_counts)
    correct = valid = chance = 0.0
    pairs = 0
    while pairs < settings.pairs:
        local = next(iterator)
        g = data_lib.to_global_batch({"views": local["views"][0], "grids": local["grids"][0]}, mesh)
        maps_a, _ = feature_fn(g["views"][:, 0])
        maps_b, _ = feature_fn(g["views"][:, 1])
        c, v, ch = counts(maps_a, maps_b, g["grids"][:, 0], g["grids"][:, 1])
        correct, valid, chance = correct + float(c), valid + float(v), chance + float(ch)
        pairs += batch_size
    results = {
        "accuracy": 100.0 * correct / max(valid, 1.0),
        "chance": 100.0 * chance / max(valid, 1.0),
        "pairs": pairs,
        "matched_locations": int(valid),
        "crop_size": settings.crop_size,
        "weights": loaded.description,
        "dataset": f"{config.data.dataset} ({config.data.split})",
    }
    common.write_results(workdir, name, results)
    return results
