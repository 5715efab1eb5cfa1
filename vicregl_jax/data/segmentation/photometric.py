"""mmsegmentation's photometric distortion on uint8 images, with OpenCV's 8-bit HSV arithmetic.

OpenCV converts uint8 RGB to HSV with 12-bit fixed-point reciprocals (H in 0-179) and back in
float32 with truncation; every step of the distortion rounds to uint8 as mmsegmentation does.
The same integer and float32 arithmetic here gives OpenCV's bytes, so that the distortion's
round trips lose what OpenCV's lose.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from vicregl_jax.data.segmentation.draws import (
    BRIGHT,
    BRIGHT_DELTA,
    CONTRAST,
    CONTRAST_ALPHA,
    CONTRAST_LAST,
    HUE,
    HUE_DELTA,
    SATURATE,
    SATURATE_ALPHA,
)


def _division_table(numerator: int, scale: float) -> np.ndarray:
    """OpenCV's fixed-point reciprocal tables: round(numerator * 2^12 / (scale * i)), 0 at i=0."""
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        table = np.where(i > 0, np.rint((numerator << 12) / (scale * np.maximum(i, 1))), 0)
    return table.astype(np.int64)


_SATURATION_DIVISION = _division_table(255, 1.0)
_HUE_DIVISION = _division_table(180, 6.0)


def _fixed_point_round(x):
    """(x + 2^11) >> 12: a 12-bit fixed-point value rounded (arithmetic shift, floors)."""
    return tf.bitwise.right_shift(x + 2048, tf.constant(12, tf.int64))


def rgb_to_hsv_uint8(rgb):
    """Returns OpenCV's 8-bit HSV (H in 0-179, S and V in 0-255) of uint8-valued RGB, as int32.

    The same integer arithmetic as cv2.cvtColor(COLOR_RGB2HSV) on uint8 images (12-bit
    fixed-point reciprocals, rounding half up), so that the distortion's round trips lose
    what OpenCV's lose.
    """
    rgb = tf.cast(rgb, tf.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = tf.maximum(tf.maximum(r, g), b)
    diff = v - tf.minimum(tf.minimum(r, g), b)
    s = _fixed_point_round(diff * tf.gather(_SATURATION_DIVISION, v))
    h = tf.where(v == r, g - b, tf.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = _fixed_point_round(h * tf.gather(_HUE_DIVISION, diff))
    h = tf.where(h < 0, h + 180, h)
    return tf.cast(tf.stack([h, s, v], axis=-1), tf.int32)


def hsv_uint8_to_rgb(hsv):
    """Returns uint8-valued RGB (float32) of OpenCV's 8-bit HSV, as cv2.cvtColor(COLOR_HSV2RGB)
    computes it in its vectorised path: float32 arithmetic, outputs truncated.

    (OpenCV 4.x / 5.x round instead for the last few pixels of a row that do not fill a
    vector, width mod 16 to 64 by CPU: those can differ by one grey level.)
    """
    hsv = tf.cast(hsv, tf.float32)
    h = hsv[..., 0] * np.float32(6.0 / 180.0)
    s = hsv[..., 1] * np.float32(1.0 / 255.0)
    v = hsv[..., 2] * np.float32(1.0 / 255.0)
    sector = tf.floor(h)
    f = h - sector
    sector = tf.cast(sector, tf.int32) % 6
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    # (r, g, b) per sector of the hue circle.
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    channels = []
    for c in range(3):
        out = choices[5][c]
        for k in range(4, -1, -1):
            out = tf.where(sector == k, choices[k][c], out)
        out = tf.where(s == 0.0, v, out)
        channels.append(out)
    return tf.clip_by_value(tf.floor(tf.stack(channels, axis=-1) * 255.0), 0.0, 255.0)


def _scale_clip_truncate(x, alpha=1.0, beta=0.0):
    """x * alpha + beta in float32, clipped to [0, 255] and truncated (numpy's astype(uint8))."""
    return tf.floor(tf.clip_by_value(x * alpha + beta, 0.0, 255.0))


def photometric_distortion(image, draws):
    """mmsegmentation's PhotoMetricDistortion on a uint8-valued float32 RGB image.

    Brightness +U(-32, 32), then contrast x U(0.5, 1.5) either second or last, saturation
    x U(0.5, 1.5) and hue + randint(-18, 18) (mod 180) in OpenCV's 8-bit HSV; each step with
    p 0.5 and rounded to uint8 as mmsegmentation does. draws: the example's uniform draws.
    """

    def contrast(x):
        return tf.cond(
            draws[CONTRAST] < 0.5, lambda: _scale_clip_truncate(x, alpha=0.5 + draws[CONTRAST_ALPHA]), lambda: x
        )

    def saturation(x):
        def apply():
            hsv = rgb_to_hsv_uint8(x)
            s = _scale_clip_truncate(tf.cast(hsv[..., 1], tf.float32), alpha=0.5 + draws[SATURATE_ALPHA])
            return hsv_uint8_to_rgb(tf.stack([hsv[..., 0], tf.cast(s, tf.int32), hsv[..., 2]], -1))

        return tf.cond(draws[SATURATE] < 0.5, apply, lambda: x)

    def hue(x):
        def apply():
            hsv = rgb_to_hsv_uint8(x)
            delta = tf.cast(tf.floor(draws[HUE_DELTA] * 36.0), tf.int32) - 18  # -18..17
            return hsv_uint8_to_rgb(tf.stack([(hsv[..., 0] + delta) % 180, hsv[..., 1], hsv[..., 2]], -1))

        return tf.cond(draws[HUE] < 0.5, apply, lambda: x)

    contrast_last = draws[CONTRAST_LAST] < 0.5
    x = tf.cond(
        draws[BRIGHT] < 0.5, lambda: _scale_clip_truncate(image, beta=64.0 * draws[BRIGHT_DELTA] - 32.0), lambda: image
    )
    x = tf.cond(contrast_last, lambda: x, lambda: contrast(x))
    x = hue(saturation(x))
    return tf.cond(contrast_last, lambda: contrast(x), lambda: x)
