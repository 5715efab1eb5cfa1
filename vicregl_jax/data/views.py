"""The per-example processing of pre-training: an image's multi-crop views, grids and colour draws.

Every random draw of the example at position p comes from `position_seed(p, seed)`: crop group
k folds in k, then the crop boxes, the flips and the colour decisions each fold in their own
salt, so a group's views do not depend on the other groups. The colour draws travel with the
uint8 views; `colour.augment_views` applies them on the accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
import tensorflow.experimental.numpy as tnp

from vicregl_jax.data import augment, crops, stream
from vicregl_jax.data.crops import CropGroup
from vicregl_jax.data.grids import location_grid
from vicregl_jax.data.images import decode_covering, resize_views

# Salts of a crop group's draws.
CROP_SALT, FLIP_SALT, COLOUR_SALT = 1, 2, 3


def example_index(
    position: tf.Tensor, num_examples: int, seed: int, shuffle: bool, block: int = 1, window: int = 1
) -> tf.Tensor:
    """Returns the example at a global position of the stream of `seed`: a permutation of the
    dataset per epoch in blocks of `block` shuffled within windows of `window` positions (see
    data/stream.py), or the dataset's order without shuffle."""
    if not shuffle:
        return position % num_examples
    shuffle_key = stream.StreamKeys.of_seed(seed).shuffle
    return stream.block_epoch_index(position, num_examples, block, window, shuffle_key)


def position_seed(position: tf.Tensor, seed: int) -> tf.Tensor:
    """Returns the stateless seed (2,) of all random draws for the example at `position`."""
    return stream.position_key(position, stream.StreamKeys.of_seed(seed).example)


def make_views(
    encoded, seed, groups: Sequence[CropGroup], grid_sizes, flip_grid, dct_method, method="bicubic", impl="pillow"
):
    """Returns the views of one image for each crop group: uint8 (count, S, S, 3) flipped
    where drawn, grids (count, n, n, 2) and colour draws.

    The draws of group k come from seeds folded from (seed, k): a group's views do not
    depend on the other groups.
    """
    group_seeds = [stream.fold(seed, k) for k in range(len(groups))]

    def draw_boxes(height, width):
        return tf.concat(
            [
                crops.sample_crop_boxes(stream.fold(s, CROP_SALT), height, width, g.count, g.scale)
                for g, s in zip(groups, group_seeds)
            ],
            axis=0,
        )

    boxes, region, region_top, region_left = decode_covering(encoded, draw_boxes, dct_method)
    out, first = [], 0
    for group, group_seed, n in zip(groups, group_seeds, grid_sizes):
        group_boxes = boxes[first : first + group.count]
        first += group.count
        flips = crops.sample_flips(stream.fold(group_seed, FLIP_SALT), group.count)
        in_region = group_boxes - tf.stack([region_top, region_left, 0, 0])
        views = resize_views(region, in_region, flips, group.size, method, impl)
        grids = location_grid(*tf.unstack(tf.cast(group_boxes, tf.float64), axis=1), n, flip=flips & flip_grid, xp=tnp)
        draws = augment.sample_colour_params(stream.fold(group_seed, COLOUR_SALT), group.count)
        out.append((views, grids, draws))
    return out


def pretrain_example(
    groups: Sequence[CropGroup],
    grid_sizes: Sequence[int],
    *,
    seed: int,
    flip_grid: bool,
    with_labels: bool,
    dct_method: str,
    impl: str,
):
    """Returns process(encoded, label, position) -> the pre-training example of one image:
    per group its views, grids and colour draws, and its label (-1 without labels)."""

    def process(encoded, label, position):
        per_group = make_views(
            encoded, position_seed(position, seed), groups, grid_sizes, flip_grid, dct_method, impl=impl
        )
        return {
            "position": position,
            "views": tuple(g[0] for g in per_group),
            "grids": tuple(g[1] for g in per_group),
            "draws": tuple(g[2] for g in per_group),
            "label": tf.cast(label, tf.int32) if with_labels else tf.constant(-1, tf.int32),
        }

    return process
