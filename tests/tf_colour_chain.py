"""The release's colour augmentations in TensorFlow: the reference the tests hold the device
chain (`vicregl_jax/data/colour.py`, JAX) to, itself checked against PIL (test_data_augment.py).
The pipeline no longer runs it: it draws the decisions (`augment.sample_colour_params`) and the
accelerator applies them.

Images are float32 in [0, 1], shape (S, S, 3) or (V, S, S, 3); per-view parameters have
shape () or (V,). The ops follow torchvision on PIL images (what the release runs):

- brightness f: x * f; contrast f: m + f (x - m) with m the mean luma of the image;
  saturation f: g + f (x - g) with g the luma of each pixel; each clipped to [0, 1].
- hue d: the hue of HSV shifted by d turns. grayscale: luma on the three channels,
  luma = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2, as PIL's convert("L")).
- Gaussian blur of standard deviation sigma, edges replicated; solarize: x -> 1 - x where
  x >= 128 / 255.

Where the numbers differ from PIL (tested in tests/test_data_augment.py): PIL rounds to
uint8 after every op, we stay in float (differences below one grey level per op); PIL's
hue works on an 8-bit hue channel (steps of 1/256 turn) where we shift exactly; PIL's
GaussianBlur approximates the Gaussian with three box blurs where we convolve with the
Gaussian itself (13 taps, 3 sigma at the largest sigma 2.0); contrast uses the exact mean
luma where PIL rounds it to an integer grey level.

`colour_augment` applies the decisions of `sample_colour_params`; run it XLA-compiled
(`tf.function(jit_compile=True)`): XLA fuses the chain of per-pixel ops into few passes.
"""
from __future__ import annotations

import tensorflow as tf

from vicregl_jax.data.augment import normalise, sample_colour_params  # noqa: F401  (the production draws)
from vicregl_jax.data.colour import (  # noqa: F401  (the recipe's constants, shared)
    BLUR_RADIUS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LUMA_WEIGHTS,
    NO_OP,
    SOLARIZE_THRESHOLD,
)


def _per_view(param: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Reshapes a () or (V,) parameter to broadcast against (S, S, 3) or (V, S, S, 3)."""
    param = tf.convert_to_tensor(param, x.dtype)
    return tf.reshape(param, tf.concat([tf.shape(param), [1, 1, 1]], axis=0))


def luma(x: tf.Tensor) -> tf.Tensor:
    """Returns the luma of RGB pixels, shape (..., S, S, 1)."""
    return tf.reduce_sum(x * tf.constant(LUMA_WEIGHTS, x.dtype), axis=-1, keepdims=True)


def adjust_brightness(x: tf.Tensor, factor) -> tf.Tensor:
    """Returns x * factor clipped to [0, 1] (PIL ImageEnhance.Brightness)."""
    return tf.clip_by_value(x * _per_view(factor, x), 0.0, 1.0)


def adjust_contrast(x: tf.Tensor, factor) -> tf.Tensor:
    """Returns the blend of x with its mean luma, clipped to [0, 1] (ImageEnhance.Contrast)."""
    mean = tf.reduce_mean(luma(x), axis=[-3, -2, -1], keepdims=True)
    return tf.clip_by_value(mean + _per_view(factor, x) * (x - mean), 0.0, 1.0)


def adjust_saturation(x: tf.Tensor, factor) -> tf.Tensor:
    """Returns the blend of x with its grayscale, clipped to [0, 1] (ImageEnhance.Color)."""
    grey = luma(x)
    return tf.clip_by_value(grey + _per_view(factor, x) * (x - grey), 0.0, 1.0)


def adjust_hue(x: tf.Tensor, delta) -> tf.Tensor:
    """Returns x with the hue of its HSV form shifted by `delta` turns (in [-0.5, 0.5])."""
    hsv = tf.image.rgb_to_hsv(x)
    hue = tf.math.floormod(hsv[..., :1] + _per_view(delta, x), 1.0)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1)), 0.0, 1.0)


def to_grayscale(x: tf.Tensor) -> tf.Tensor:
    """Returns the luma of x on all three channels."""
    return tf.broadcast_to(luma(x), tf.shape(x))


def gaussian_kernel(sigma, radius: int = BLUR_RADIUS) -> tf.Tensor:
    """Returns normalised Gaussian weights of standard deviation sigma, (..., 2 * radius + 1)."""
    sigma = tf.convert_to_tensor(sigma, tf.float32)[..., None]
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    weights = tf.exp(-0.5 * tf.square(taps / sigma))
    return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def _replicate_edges(rows: tf.Tensor, amount: int, step: int = 1, axis: int = 0) -> tf.Tensor:
    """Returns 2-D `rows` with its first and last `step` entries along `axis` repeated `amount`
    times on either side (slices and tiles: a gather here would keep XLA from fusing)."""
    if axis == 0:
        first, last, tiles = rows[:step], rows[-step:], [amount, 1]
    else:
        first, last, tiles = rows[:, :step], rows[:, -step:], [1, amount]
    return tf.concat([tf.tile(first, tiles), rows, tf.tile(last, tiles)], axis=axis)


def gaussian_blur(x: tf.Tensor, sigma, radius: int = BLUR_RADIUS) -> tf.Tensor:
    """Returns the image x (H, W, C) blurred by a Gaussian of std `sigma`, edges replicated."""
    weights = gaussian_kernel(sigma, radius)
    height, width, channels = x.shape
    taps = range(2 * radius + 1)
    # Separable, on the (H, W * C) layout so that both passes shift along contiguous memory:
    # XLA turns the sums of shifted slices into one vectorised loop each (no transposes).
    rows = tf.reshape(x, [height, width * channels])
    padded = _replicate_edges(rows, radius)
    rows = tf.add_n([weights[t] * padded[t : t + height] for t in taps])
    padded = _replicate_edges(rows, radius, step=channels, axis=1)
    span = width * channels
    rows = tf.add_n([weights[t] * padded[:, channels * t : channels * t + span] for t in taps])
    return tf.reshape(rows, [height, width, channels])


def solarize(x: tf.Tensor) -> tf.Tensor:
    """Returns x with the values >= 128/255 inverted (PIL ImageOps.solarize(threshold=128))."""
    return tf.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)


def colour_jitter(x: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
    """Returns one view (S, S, 3) after brightness, contrast, saturation and hue in `order`."""

    def apply_slot(slot, x):
        x = tf.switch_case(
            params["order"][slot],
            [
                lambda: adjust_brightness(x, params["brightness"]),
                lambda: adjust_contrast(x, params["contrast"]),
                lambda: adjust_saturation(x, params["saturation"]),
                lambda: adjust_hue(x, params["hue"]),
                lambda: x,
            ],
        )
        return slot + 1, x

    # A loop, not four unrolled switches: XLA compiles each op once (seconds, not a minute).
    return tf.while_loop(lambda slot, _: slot < 4, apply_slot, (0, x))[1]


def colour_augment_view(x: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
    """Returns one view (S, S, 3) in [0, 1] after jitter, grayscale, blur and solarize."""
    x = colour_jitter(x, params)
    x = tf.where(params["grayscale"], to_grayscale(x), x)
    x = tf.cond(params["blur"], lambda: gaussian_blur(x, params["sigma"]), lambda: x)
    return tf.where(params["solarize"], solarize(x), x)


def colour_augment(
    views: tf.Tensor,
    flips: tf.Tensor,
    params: dict[str, tf.Tensor],
    *,
    enabled: bool = True,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> tf.Tensor:
    """Returns views (..., S, S, 3) flipped where `flips` (...), colour-augmented (when enabled)
    and normalised, float32 (..., S, S, 3). Parameters have the leading shape (...).

    The views hold values in [0, 255]: uint8, or float straight from a resize, which are
    first rounded and clipped to 8-bit levels as PIL's resize leaves them. Meant for whole
    batches, XLA-compiled: one call reads and writes the batch once around the per-view ops.
    """
    shape = tf.shape(views)
    size = views.shape[-3:]
    x = tf.clip_by_value(tf.round(tf.cast(views, tf.float32)), 0.0, 255.0) / 255.0
    x = tf.reshape(x, [-1, *size])
    flips = tf.reshape(flips, [-1])
    x = tf.where(flips[:, None, None, None], tf.reverse(x, axis=[2]), x)
    if enabled:
        flat = {k: tf.reshape(v, [-1, 4] if k == "order" else [-1]) for k, v in params.items()}
        x = tf.map_fn(
            lambda args: colour_augment_view(*args),
            (x, flat),
            fn_output_signature=tf.TensorSpec(size, tf.float32),
        )
    return tf.reshape(normalise(x, mean, std), shape)
