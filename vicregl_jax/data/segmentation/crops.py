"""mmsegmentation's geometry: the keep-ratio rescale, OpenCV's resizes, the class-balanced random
crop, sliding windows, and the normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from vicregl_jax.data.segmentation.draws import CROP_X, CROP_Y
from vicregl_jax.data.segmentation.layouts import IGNORE_LABEL

# mmsegmentation's normalisation (0-255 RGB): ImageNet's mean and std (0.229 for red, not the
# 0.228 that pre-training uses).
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
_CROP_TRIES = 10


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """Returns (height, width) after mmcv's keep-ratio rescale to scale = (long, short) bounds:
    the largest size whose long edge fits max(scale) and short edge fits min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def slide_windows(
    height: int, width: int, crop: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Returns the (top, left, height, width) windows of sliding-window inference.

    mmsegmentation's grid: windows every `stride` pixels, the last shifted back to end at the
    border; an image smaller than the crop gives one window of its own size on that axis.
    """

    def starts(size, c, s):
        count = max(size - c + s - 1, 0) // s + 1
        return [max(min(i * s + c, size) - c, 0) for i in range(count)]

    ch, cw = min(crop[0], height), min(crop[1], width)
    return [(y, x, ch, cw) for y in starts(height, crop[0], stride[0]) for x in starts(width, crop[1], stride[1])]


def resize_image(image, height, width):
    """Returns the image resized bilinearly without antialiasing (OpenCV's INTER_LINEAR), rounded to
    uint8 levels (float32)."""
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]), method="bilinear", antialias=False)
    return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


def _nearest_indices(size_in, size_out):
    """OpenCV's INTER_NEAREST source index of every output pixel: floor(i * in / out)."""
    ratio = 1.0 / (tf.cast(size_out, tf.float64) / tf.cast(size_in, tf.float64))
    index = tf.cast(tf.floor(tf.cast(tf.range(size_out), tf.float64) * ratio), tf.int32)
    return tf.minimum(index, size_in - 1)


def resize_mask(mask, height, width):
    """Returns the mask resized by OpenCV's INTER_NEAREST rule."""
    shape = tf.shape(mask)
    mask = tf.gather(mask, _nearest_indices(shape[0], height), axis=0)
    return tf.gather(mask, _nearest_indices(shape[1], width), axis=1)


def rescale_size_tf(height, width, long_edge, short_edge):
    """Returns rescale_size's (height, width) in graph mode, in float64 as mmcv computes it in Python."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    factor = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
    return (tf.cast(tf.floor(h * factor + 0.5), tf.int32), tf.cast(tf.floor(w * factor + 0.5), tf.int32))


def _crop_is_balanced(mask, top, left, crop_h, crop_w, cat_max_ratio):
    """mmsegmentation's test: 2+ labelled classes and none above cat_max_ratio of them."""
    crop = tf.reshape(tf.cast(mask[top : top + crop_h, left : left + crop_w], tf.int32), [-1])
    counts = tf.math.bincount(crop, minlength=256, maxlength=256)[:IGNORE_LABEL]
    total = tf.reduce_sum(counts)
    return tf.logical_and(
        tf.math.count_nonzero(counts) > 1,
        tf.cast(tf.reduce_max(counts), tf.float64) < cat_max_ratio * tf.cast(tf.maximum(total, 1), tf.float64),
    )


def random_crop(image, mask, draws, crop_size, cat_max_ratio):
    """Returns (image, mask) cropped as mmsegmentation's RandomCrop: the first of up to 10
    drawn windows whose mask passes the class-balance test, else the 11th drawn."""
    shape = tf.shape(mask)
    crop_h, crop_w = tf.minimum(shape[0], crop_size[0]), tf.minimum(shape[1], crop_size[1])
    tops = tf.cast(tf.floor(draws[CROP_Y : CROP_Y + 11] * tf.cast(shape[0] - crop_h + 1, tf.float32)), tf.int32)
    lefts = tf.cast(tf.floor(draws[CROP_X : CROP_X + 11] * tf.cast(shape[1] - crop_w + 1, tf.float32)), tf.int32)
    if cat_max_ratio < 1.0:
        (choice,) = tf.while_loop(
            lambda c: tf.logical_and(
                c < _CROP_TRIES,
                tf.logical_not(_crop_is_balanced(mask, tops[c], lefts[c], crop_h, crop_w, cat_max_ratio)),
            ),
            lambda c: (c + 1,),
            (tf.constant(0),),
        )
    else:
        choice = tf.constant(0)
    top, left = tops[choice], lefts[choice]
    return (image[top : top + crop_h, left : left + crop_w], mask[top : top + crop_h, left : left + crop_w])


def normalise(image):
    """Returns (image - mean) / std in mmsegmentation's RGB constants, float32."""
    return (image - np.asarray(MEAN_RGB, np.float32)) / np.asarray(STD_RGB, np.float32)
