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


def correspondence_counts(feat_a, feat_b, grid_a, grid_b) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (correct, valid, chance) over a batch: feat (B, N, C), grid (B, n, n, 2).

    chance is the expected number correct when the neighbour is drawn uniformly from B's
    cells: the count of cells within one of the true cell, over nb^2, summed over valid cells.
    """
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
        near = (jnp.minimum(cells + 1, nb - 1) - jnp.maximum(cells - 1, 0) + 1).prod(axis=-1) / nb**2
        return jnp.sum(ok & inside), jnp.sum(inside), jnp.sum(jnp.where(inside, near, 0.0))

    correct, valid, chance = jax.vmap(one)(feat_a, feat_b, grid_a, grid_b)
    return jnp.sum(correct), jnp.sum(valid), jnp.sum(chance)


def run(config, workdir, weights=None, *, random_init: bool = False, name: str = "correspond",
        features: str = "backbone") -> dict:
    """Measures correspondence accuracy of the frozen backbone's maps on pairs of random crops
    of config.dataset (no colour augmentation, flips with corrected grids)."""
    from vicregl_jax import data as data_lib
    from vicregl_jax import sharding
    from vicregl_jax.evaluate import common
    from vicregl_jax.models import backbone_stride

    mesh = sharding.make_mesh(config.num_devices)
    backbone, description = common.load_backbone(config, workdir, weights, random_init=random_init)
    feature_fn = common.make_feature_fn(backbone, mesh)
    batch_size = common.eval_batch_size(config, mesh)
    group = data_lib.CropGroup(config.correspond_crop_size, 2, tuple(config.correspond_scale))
    iterator = data_lib.make_pretrain_iterator(
        config.dataset, config.train_split, groups=[group], global_batch_size=batch_size, seed=config.seed + 1,
        stride=backbone_stride(config.arch), flip_grid=True, with_labels=False, augment_colour=False,
        data_dir=config.data_dir, manual_dir=config.manual_dir,
    )
    counts = jax.jit(correspondence_counts)
    correct = valid = chance = 0.0
    pairs = 0
    while pairs < config.correspond_pairs:
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
        "pairs": pairs, "matched_locations": int(valid), "crop_size": config.correspond_crop_size,
        "weights": description, "dataset": f"{config.dataset} ({config.train_split})",
    }
    common.write_results(workdir, name, results)
    return results
