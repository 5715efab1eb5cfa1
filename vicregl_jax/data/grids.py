"""Location grids of crops: one formula for numpy, TF and JAX.

Imports neither TensorFlow nor JAX: pass the array namespace of your arrays as `xp`
(`numpy`, `jax.numpy`, or `tensorflow.experimental.numpy` inside tf.data).
"""

from __future__ import annotations

import numpy as np


def location_grid(top, left, height, width, grid_size: int, flip=False, xp=np):
    """Returns the (row, col) centres of the n x n cells of crops, float32 (..., n, n, 2).

    row[k] = top + (k + 0.5) * height / n and col[l] = left + (l + 0.5) * width / n, in the
    original image's pixels (continuous coordinates: pixel r covers [r, r + 1)). Where `flip`
    is true the columns are reversed, so that each cell of a flipped view keeps pointing at
    the pixels it shows. Arguments broadcast: arrays of shape (...) give many crops at once.
    Computed in float64 with numpy and TF, in JAX's default float otherwise.
    """
    fractions = (np.arange(grid_size) + 0.5) / grid_size
    steps = xp.asarray(fractions)
    reversed_steps = xp.asarray(fractions[::-1].copy())

    def column(a):
        return xp.asarray(a, dtype=steps.dtype)[..., None]

    flip = xp.asarray(flip, dtype=steps.dtype)[..., None]
    rows = column(top) + steps * column(height)  # (..., n)
    cols = column(left) + xp.where(flip > 0, reversed_steps, steps) * column(width)
    # (..., n, 1, 2) + (..., 1, n, 2): multiplying by unit vectors stacks the two exactly.
    unit_row, unit_col = xp.asarray(np.array([1.0, 0.0])), xp.asarray(np.array([0.0, 1.0]))
    grid = rows[..., :, None, None] * unit_row + cols[..., None, :, None] * unit_col
    return xp.asarray(grid, dtype=xp.float32)
