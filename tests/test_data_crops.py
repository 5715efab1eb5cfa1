"""Crop boxes and location grids (random resized crop; grid of cell centres)."""

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow.experimental.numpy as tnp

from references.pil import pil_crop_box
from vicregl_jax.data import CropGroup, location_grid
from vicregl_jax.data.crops import grid_size, sample_crop_boxes, sample_flips


def test_location_grid_of_a_known_crop_is_the_spec_formula_by_hand():
    # Crop top 10, left 20, 70 x 140 pixels, n = 7: cells of 10 x 20 pixels.
    grid = location_grid(10, 20, 70, 140, 7)
    assert grid.shape == (7, 7, 2) and grid.dtype == np.float32
    np.testing.assert_array_equal(grid[0, 0], [15.0, 30.0])  # 10 + 0.5 * 10, 20 + 0.5 * 20
    np.testing.assert_array_equal(grid[3, 1], [45.0, 50.0])  # 10 + 3.5 * 10, 20 + 1.5 * 20
    np.testing.assert_array_equal(grid[6, 6], [75.0, 150.0])
    np.testing.assert_array_equal(grid[:, 2, 0], [15, 25, 35, 45, 55, 65, 75])
    flipped = location_grid(10, 20, 70, 140, 7, flip=True)
    np.testing.assert_array_equal(flipped[0, 0], [15.0, 150.0])  # columns reversed, rows kept
    np.testing.assert_array_equal(flipped[..., 1], grid[:, ::-1, 1])
    np.testing.assert_array_equal(flipped[..., 0], grid[..., 0])
    # A 96 crop at stride 32: n = 3, uneven sizes give fractional centres.
    np.testing.assert_allclose(location_grid(0, 0, 50, 31, 3)[2, 1], [50 * 2.5 / 3, 31 * 1.5 / 3], rtol=1e-6)


def test_location_grid_broadcasts_and_is_one_formula_for_numpy_tf_and_jax():
    rng = np.random.default_rng(0)
    boxes = rng.integers(1, 300, size=(20, 4))
    flips = rng.random(20) < 0.5
    batched = location_grid(*boxes.T, 5, flip=flips)
    assert batched.shape == (20, 5, 5, 2)
    in_tf = location_grid(*tf.unstack(tf.constant(boxes), axis=1), 5, flip=tf.constant(flips), xp=tnp)
    assert isinstance(in_tf, tf.Tensor) and in_tf.dtype == tf.float32
    np.testing.assert_array_equal(in_tf.numpy(), batched)
    in_jax = location_grid(*jnp.asarray(boxes).T, 5, flip=jnp.asarray(flips), xp=jnp)
    assert in_jax.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(in_jax), batched, rtol=1e-6)
    for k in range(3):
        np.testing.assert_array_equal(batched[k], location_grid(*boxes[k], 5, flip=flips[k]))


def test_crop_group_and_stride_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"size=0"):
        CropGroup(0, 2, (0.08, 1.0))
    with pytest.raises(ValueError, match=r"count=0"):
        CropGroup(224, 0, (0.08, 1.0))
    with pytest.raises(ValueError, match=r"scale=\(0.5, 0.2\)"):
        CropGroup(224, 2, (0.5, 0.2))
    with pytest.raises(ValueError, match=r"crop size 100 is not divisible by the backbone stride 32.*96 or 128"):
        grid_size(CropGroup(100, 2, (0.08, 1.0)), 32)
    assert grid_size(CropGroup(224, 2, (0.08, 1.0)), 32) == 7
    assert grid_size(CropGroup(96, 6, (0.08, 0.4)), 32) == 3


@pytest.mark.parametrize("height,width,scale", [(200, 300, (0.08, 1.0)), (375, 500, (0.08, 0.4)), (50, 40, (0.4, 1.0))])
def test_crop_boxes_fit_and_follow_the_torchvision_distribution(height, width, scale):
    count = 4000
    boxes = sample_crop_boxes(tf.constant([3, 4], tf.int64), height, width, count, scale).numpy()
    top, left, h, w = boxes.T
    assert (h > 0).all() and (w > 0).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    # Rounding of w and h moves the area by at most about (w + h) / 2 pixels.
    slack = (w + h) / (height * width)
    assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
    assert (w / h >= 0.75 - 1.5 / h).all() and (w / h <= 4 / 3 + 1.5 / h).all()
    # Same distribution as the one-try-at-a-time reference (torchvision's algorithm).
    rng = np.random.default_rng(0)
    ref = np.array([pil_crop_box(rng, height, width, scale) for _ in range(count)])
    for ours, theirs, norm in zip(boxes.T, ref.T, (height, width, height, width)):
        # Means of [0, 1]-normalised values: standard error < 0.3 / sqrt(4000) ~ 0.005.
        assert abs(ours.mean() - theirs.mean()) / norm < 0.025


def test_crop_falls_back_to_the_centre_crop_clipped_to_the_ratio_range():
    # 10 x 1000: no crop of area >= 8 % fits 10 rows with ratio <= 4/3, so every try fails.
    boxes = sample_crop_boxes(tf.constant([1, 2], tf.int64), 10, 1000, 5, (0.08, 1.0)).numpy()
    np.testing.assert_array_equal(boxes, [[0, 493, 10, 13]] * 5)
    assert pil_crop_box(np.random.default_rng(0), 10, 1000, (0.08, 1.0)) == (0, 493, 10, 13)
    tall = sample_crop_boxes(tf.constant([1, 2], tf.int64), 1000, 10, 1, (0.08, 1.0)).numpy()
    np.testing.assert_array_equal(tall, [[493, 0, 13, 10]])
    tiny = sample_crop_boxes(tf.constant([1, 2], tf.int64), 1, 1, 3, (0.08, 1.0)).numpy()
    np.testing.assert_array_equal(tiny, [[0, 0, 1, 1]] * 3)


def test_flips_are_fair_and_deterministic():
    flips = sample_flips(tf.constant([5, 6], tf.int64), 20000).numpy()
    assert abs(flips.mean() - 0.5) < 0.02  # 5 standard errors
    np.testing.assert_array_equal(flips, sample_flips(tf.constant([5, 6], tf.int64), 20000).numpy())
    other = sample_flips(tf.constant([5, 7], tf.int64), 20000).numpy()
    assert 0.4 < (flips == other).mean() < 0.6  # another seed: independent draws
