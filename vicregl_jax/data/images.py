"""Per-image work in the TensorFlow graph: decoding, and the crops, resizes and flips of views.

Host work is geometry only. Per image: the crop boxes of all views are drawn from the image
size (read from the JPEG header without decoding), only the rectangle that holds them is
decoded (`decode_and_crop_jpeg`, the same pixels as decoding all and cropping), and each
view is cropped, resized and flipped by one compiled call per crop group (`resample.py`: the
bytes of Pillow's bicubic resize, as the release makes them). Evaluation images are resized
and centre-cropped the same way (`centre_view`).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from vicregl_jax.data import crops, resample

_JPEG_BLOCK = 16


def decode_rgb(encoded: tf.Tensor, dct_method: str = "INTEGER_ACCURATE") -> tf.Tensor:
    """Returns the uint8 (H, W, 3) RGB image of encoded JPEG/PNG/GIF/BMP/WebP bytes.

    Grey images are replicated to RGB, alpha is dropped, CMYK JPEGs are converted, animated
    images give their first frame. JPEGs are decoded with `dct_method`.
    """
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=dct_method),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8),
    )
    return tf.ensure_shape(image, [None, None, 3])


def decode_covering(encoded: tf.Tensor, draw_boxes: Callable, dct_method: str):
    """Returns (boxes, region, region_top, region_left): the int32 (n, 4) crop boxes that
    `draw_boxes(height, width)` draws for the image, and the uint8 part of the image that holds
    them all, decoded alone for a JPEG (its size read from the header), with its offset."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        boxes = draw_boxes(shape[0], shape[1])
        top, left = tf.reduce_min(boxes[:, 0]), tf.reduce_min(boxes[:, 1])
        bottom = tf.reduce_max(boxes[:, 0] + boxes[:, 2])
        right = tf.reduce_max(boxes[:, 1] + boxes[:, 3])
        # libjpeg's cropped decoding upsamples chroma differently at the window's edges: a
        # margin of one 16-pixel block (the largest JPEG block) aligned to the block grid gives
        # exactly the pixels of a full decode (tests/test_data_colour.py), then we cut it off.
        margin = _JPEG_BLOCK
        top0 = tf.maximum(0, (top - margin) // margin * margin)
        left0 = tf.maximum(0, (left - margin) // margin * margin)
        bottom0 = tf.minimum(shape[0], -(-(bottom + margin) // margin) * margin)
        right0 = tf.minimum(shape[1], -(-(right + margin) // margin) * margin)
        window = tf.stack([top0, left0, bottom0 - top0, right0 - left0])
        region = tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method=dct_method)
        region = region[top - top0 : bottom - top0, left - left0 : right - left0]
        return boxes, tf.ensure_shape(region, [None, None, 3]), top, left

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
        image = tf.ensure_shape(image, [None, None, 3])
        shape = tf.shape(image)
        zero = tf.constant(0, tf.int32)
        return draw_boxes(shape[0], shape[1]), image, zero, zero

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def resize(image: tf.Tensor, size, method: str = "bicubic") -> tf.Tensor:
    """Returns the image resized to `size` (h, w) by TensorFlow with antialiasing, float32.

    Values are not rounded: bicubic overshoots [0, 255] near edges; PIL rounds and clips to
    uint8, which `to_uint8` does. Pillow also rounds between its two passes: `resize_views`
    and `centre_view` give Pillow's bytes with resize="pillow".
    """
    return tf.image.resize(image, size, method=method, antialias=True)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Returns a resized float image rounded and clipped to uint8, as PIL leaves it."""
    return tf.saturate_cast(tf.round(image), tf.uint8)


def resize_views(region, boxes, flips, size: int, method: str = "bicubic", impl: str = "pillow") -> tf.Tensor:
    """Returns the uint8 (V, size, size, 3) views region[top:top + h, left:left + w] (boxes (V, 4)
    int32 in region pixels) resized to size x size with `method` and mirrored where flips (V,).

    impl "pillow": one compiled call (`resample.crop_resize`, Pillow's bytes); "tensorflow":
    TensorFlow ops per view.
    """
    count = boxes.shape[0]
    if impl == "pillow":
        kind = resample.FILTERS[method]
        views = tf.numpy_function(
            lambda r, b, f: resample.crop_resize(r, b, f, size, kind), [region, boxes, flips], tf.uint8, stateful=False
        )
        return tf.ensure_shape(views, [count, size, size, 3])
    views = []
    for v in range(count):
        top, left, height, width = tf.unstack(boxes[v])
        view = to_uint8(resize(region[top : top + height, left : left + width], [size, size], method))
        # A cond, not tf.where: where would compute the reversed copy of every view.
        views.append(tf.cond(flips[v], lambda view=view: tf.reverse(view, axis=[1]), lambda view=view: view))
    return tf.stack(views)


def centre_view(image: tf.Tensor, size: int, resize_size: int, method: str = "bicubic", impl: str = "pillow"):
    """Returns the uint8 (size, size, 3) centre crop of the image resized to short side
    resize_size (with impl "pillow", only the crop's pixels are computed, as Pillow's)."""
    shape = crops.resized_shape(tf.shape(image)[0], tf.shape(image)[1], resize_size)
    offsets = crops.centre_crop_offsets(shape, size)
    if impl == "pillow":

        def window(image, shape, offsets):
            return resample.resize(image, shape[0], shape[1], method, window=(*offsets, size, size))

        view = tf.numpy_function(window, [image, shape, offsets], tf.uint8, stateful=False)
        return tf.ensure_shape(view, [size, size, 3])
    resized = to_uint8(resize(image, shape, method))
    top, left = tf.unstack(offsets)
    return resized[top : top + size, left : left + size]
