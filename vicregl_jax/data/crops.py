"""Random resized crops in original-image pixels, and the location grids of their cells.

A view is described by its crop box (top, left, height, width) in the pixels of the
decoded original image. The local loss matches views by the centres of the n x n cells
of each crop, so everything here stays in those coordinates.

Randomness is stateless (`tf.random.stateless_*`): a crop is a pure function of its seed.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from vicregl_jax.data.grids import location_grid  # noqa: F401  (re-exported)

# Aspect-ratio range of the random resized crop (width / height).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Tries before falling back to a centre crop, as torchvision and the release do.
CROP_TRIES = 10


@dataclasses.dataclass(frozen=True)
class CropGroup:
    """`count` views of `size` x `size` pixels, each a random crop of `scale` of the image area."""

    size: int
    count: int
    scale: tuple[float, float]

    def __post_init__(self):
        if not (isinstance(self.size, int) and self.size > 0):
            raise ValueError(f"CropGroup size={self.size!r}: give a positive int, e.g. 224.")
        if not (isinstance(self.count, int) and self.count > 0):
            raise ValueError(f"CropGroup count={self.count!r}: give a positive int, e.g. 2.")
        lo, hi = (float(s) for s in self.scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(
                f"CropGroup scale={self.scale!r}: give (min, max) with 0 < min <= max <= 1, e.g. (0.08, 1.0)."
            )
        object.__setattr__(self, "scale", (lo, hi))


# The release's recipes.
RESNET_GROUPS = (CropGroup(224, 2, (0.08, 1.0)),)
CONVNEXT_GROUPS = (CropGroup(224, 2, (0.4, 1.0)), CropGroup(96, 6, (0.08, 0.4)))


def grid_size(group: CropGroup, stride: int) -> int:
    """Returns n, the side of the location grid of a view: crop size / backbone stride."""
    if stride <= 0 or group.size % stride:
        lower = max(stride, group.size // max(stride, 1) * stride)
        raise ValueError(
            f"crop size {group.size} is not divisible by the backbone stride {stride}: use a "
            f"size that is a multiple of {stride} (e.g. {lower} or {lower + stride}), or pass "
            "the stride of your backbone as `stride=`."
        )
    return group.size // stride


def sample_crop_boxes(
    seed: tf.Tensor,
    image_height: tf.Tensor,
    image_width: tf.Tensor,
    count: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
) -> tf.Tensor:
    """Returns `count` random resized crop boxes (top, left, height, width) as int32 (count, 4).

    Per box: area fraction s ~ U(scale), log aspect ratio ~ U(log ratio); w = round(sqrt(A s r)),
    h = round(sqrt(A s / r)); the first of 10 tries with 0 < w <= W and 0 < h <= H is kept,
    with top ~ U{0..H-h} and left ~ U{0..W-w}; if none fits, the centre crop of the image
    clipped to the ratio range. All 10 tries are drawn at once (vectorised), which changes
    nothing in distribution since the tries are independent.
    """
    height = tf.cast(image_height, tf.float64)
    width = tf.cast(image_width, tf.float64)
    u = tf.random.stateless_uniform([count, CROP_TRIES, 4], seed, dtype=tf.float64)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    # tf.round rounds half to even, like Python's round() in the reference.
    w = tf.round(tf.sqrt(target_area * aspect))
    h = tf.round(tf.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    found = tf.reduce_any(fits, axis=1)
    pick = lambda t: tf.gather(t, first, axis=1, batch_dims=1)  # noqa: E731
    h, w = pick(h), pick(w)
    # Uniform integers in {0..H-h}: floor(u * (H - h + 1)), clipped against u rounding to 1.
    top = tf.minimum(tf.floor(pick(u[..., 2]) * (height - h + 1.0)), height - h)
    left = tf.minimum(tf.floor(pick(u[..., 3]) * (width - w + 1.0)), width - w)

    # Fallback: the whole image, clipped to the ratio range, centred.
    in_ratio = width / height
    fb_w = tf.where(in_ratio < ratio[0], width, tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width))
    fb_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
    fb_top = tf.floor((height - fb_h) / 2.0)
    fb_left = tf.floor((width - fb_w) / 2.0)
    boxes = tf.stack(
        [
            tf.where(found, top, fb_top),
            tf.where(found, left, fb_left),
            tf.where(found, h, fb_h),
            tf.where(found, w, fb_w),
        ],
        axis=-1,
    )
    return tf.cast(boxes, tf.int32)


def sample_flips(seed: tf.Tensor, count: int, probability: float = 0.5) -> tf.Tensor:
    """Returns `count` booleans: whether each view is flipped horizontally (p = 0.5)."""
    return tf.random.stateless_uniform([count], seed) < probability


def resized_shape(image_height, image_width, resize_size: int) -> tf.Tensor:
    """Returns the int32 (2,) shape of an image resized so its shorter side is `resize_size`.

    As torchvision's Resize(int): the short side becomes resize_size, the long one
    int(resize_size * long / short).
    """
    h = tf.cast(image_height, tf.float64)
    w = tf.cast(image_width, tf.float64)
    short = tf.minimum(h, w)
    target = tf.constant(resize_size, tf.float64)
    new_h = tf.where(h <= w, target, tf.floor(target * h / short))
    new_w = tf.where(h <= w, tf.floor(target * w / short), target)
    return tf.cast(tf.stack([new_h, new_w]), tf.int32)


def centre_crop_offsets(shape: tf.Tensor, size: int) -> tf.Tensor:
    """Returns the int32 (top, left) of a centred size x size crop of an image of `shape`."""
    # torchvision's CenterCrop: int(round((H - size) / 2)); tf.round is half-to-even like round().
    return tf.cast(tf.round(tf.cast(shape - size, tf.float64) / 2.0), tf.int32)
