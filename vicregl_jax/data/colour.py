"""The colour augmentations of the release's views and the normalisation, in JAX.

The hosts send uint8 views and, per view, the random draws of the colour chain (see
`vicregl_jax.data.augment.sample_colour_params`); `augment_views` applies them inside the
jitted train step, on the batch sharded over the devices:

    views = tuple(colour.augment_views(v, d, dtype=jnp.bfloat16)
                  for v, d in zip(batch["views"], batch["draws"]))

Everything is elementwise or reduces over the pixels of one view, so a batch sharded along
its first axis stays sharded with no communication. The ops work on the three colour planes
(..., S, S) separately: the last axis of an array is then a row of pixels, not 3 channels,
which TPUs lay out without padding.

The ops are those of `augment.py` (TensorFlow, the host chain), written again in jax.numpy,
and equal to them to float rounding (tests/test_data_colour.py): brightness x f; contrast
m + f (x - m) with m the mean luma of the view; saturation g + f (x - g) with g the luma of
each pixel (each clipped to [0, 1]); hue shifted by d turns in HSV; grayscale (ITU-R 601-2
luma); Gaussian blur (13 taps, edges replicated); solarize x -> 1 - x where x >= 128/255.
Importable without TensorFlow.
"""
from __future__ import annotations

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
# The release normalises red with std 0.228, not the usual ImageNet 0.229 (its
# transforms.py); the pre-trained weights expect it, so we keep it.
IMAGENET_STD = (0.228, 0.224, 0.225)

LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Colour jitter of the release: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1.
JITTER_PROBABILITY = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
GRAYSCALE_PROBABILITY = 0.2
BLUR_SIGMA = (0.1, 2.0)
BLUR_RADIUS = 6  # taps on each side: 3 sigma at the largest sigma
# (even-indexed view, odd-indexed view) probabilities; the index counts within a crop group.
BLUR_PROBABILITY = (1.0, 0.1)
SOLARIZE_PROBABILITY = (0.0, 0.2)
SOLARIZE_THRESHOLD = 128.0 / 255.0

# Indices of the jitter ops in draws["order"]; NO_OP marks views without jitter.
BRIGHTNESS_OP, CONTRAST_OP, SATURATION_OP, HUE_OP, NO_OP = range(5)

# The draws of one view and their dtypes: "order" is (..., 4), the others (...).
DRAW_KEYS = ("order", "brightness", "contrast", "saturation", "hue", "grayscale", "blur",
             "sigma", "solarize")


def _per_view(param):
    """Returns a (...) per-view parameter broadcastable against planes (..., S, S)."""
    return jnp.asarray(param)[..., None, None]


def luma(r, g, b):
    """Returns the luma of RGB planes (0.299 R + 0.587 G + 0.114 B)."""
    wr, wg, wb = LUMA_WEIGHTS
    return r * wr + g * wg + b * wb


def _blend(planes, anchor, factor):
    """Returns each plane as anchor + factor (plane - anchor), clipped to [0, 1]."""
    return tuple(jnp.clip(anchor + factor * (p - anchor), 0.0, 1.0) for p in planes)


def adjust_brightness(planes, factor):
    """Returns the planes times `factor` (per view), clipped to [0, 1]."""
    return tuple(jnp.clip(p * _per_view(factor), 0.0, 1.0) for p in planes)


def adjust_contrast(planes, factor):
    """Returns the planes blended with the mean luma of their view, clipped to [0, 1]."""
    mean = jnp.mean(luma(*planes), axis=(-2, -1), keepdims=True)
    return _blend(planes, mean, _per_view(factor))


def adjust_saturation(planes, factor):
    """Returns the planes blended with the luma of each pixel, clipped to [0, 1]."""
    return _blend(planes, luma(*planes), _per_view(factor))


def rgb_to_hsv(r, g, b):
    """Returns (hue in [0, 1) turns, saturation, value) of RGB planes in [0, 1]."""
    value = jnp.maximum(jnp.maximum(r, g), b)
    spread = value - jnp.minimum(jnp.minimum(r, g), b)
    saturation = jnp.where(value > 0, spread / jnp.where(value > 0, value, 1.0), 0.0)
    norm = 1.0 / (6.0 * jnp.where(spread > 0, spread, 1.0))
    hue = jnp.where(
        value == r, norm * (g - b), jnp.where(value == g, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0)
    )
    hue = jnp.where(spread > 0, hue, 0.0)
    return jnp.where(hue < 0, hue + 1.0, hue), saturation, value


def hsv_to_rgb(hue, saturation, value):
    """Returns the RGB planes of HSV planes (hue in turns)."""
    sixths = hue * 6.0
    red = jnp.clip(jnp.abs(sixths - 3.0) - 1.0, 0.0, 1.0)
    green = jnp.clip(2.0 - jnp.abs(sixths - 2.0), 0.0, 1.0)
    blue = jnp.clip(2.0 - jnp.abs(sixths - 4.0), 0.0, 1.0)
    grey = 1.0 - saturation
    return tuple(value * (grey + saturation * c) for c in (red, green, blue))


def adjust_hue(planes, delta):
    """Returns the planes with their HSV hue shifted by `delta` turns (per view)."""
    hue, saturation, value = rgb_to_hsv(*planes)
    hue = jnp.mod(hue + _per_view(delta), 1.0)
    return tuple(jnp.clip(p, 0.0, 1.0) for p in hsv_to_rgb(hue, saturation, value))


def to_grayscale(planes):
    """Returns the luma of the planes, three times."""
    grey = luma(*planes)
    return grey, grey, grey


def gaussian_kernel(sigma, radius: int = BLUR_RADIUS):
    """Returns normalised Gaussian weights of standard deviation sigma, (..., 2 radius + 1)."""
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * jnp.square(taps / jnp.asarray(sigma, jnp.float32)[..., None]))
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _blur_axis(plane, weights, axis: int, radius: int):
    """Returns the plane convolved along `axis` (-2 or -1) with per-view weights, edges replicated."""
    size = plane.shape[axis]
    pad = [(0, 0)] * plane.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(plane, pad, mode="edge")
    total = 0.0
    for t in range(2 * radius + 1):
        shifted = padded[..., t : t + size, :] if axis == -2 else padded[..., t : t + size]
        total = total + weights[..., t, None, None] * shifted
    return total


def gaussian_blur(planes, sigma, radius: int = BLUR_RADIUS):
    """Returns the planes blurred by a Gaussian of std `sigma` (per view), edges replicated."""
    weights = gaussian_kernel(sigma, radius)
    return tuple(_blur_axis(_blur_axis(p, weights, -2, radius), weights, -1, radius) for p in planes)


def solarize(planes):
    """Returns the planes with values >= 128/255 inverted."""
    return tuple(jnp.where(p >= SOLARIZE_THRESHOLD, 1.0 - p, p) for p in planes)


def _blend_slot(planes, op, draws):
    """Returns the planes after the blend op `op` (per view: brightness, contrast, saturation,
    or NO_OP). The three are one blend with another anchor and factor: one pass, not three."""
    anchor = jnp.where(
        _per_view(op == CONTRAST_OP),
        jnp.mean(luma(*planes), axis=(-2, -1), keepdims=True),
        jnp.where(_per_view(op == SATURATION_OP), luma(*planes), 0.0),
    )
    factor = jnp.select(
        [op == BRIGHTNESS_OP, op == CONTRAST_OP, op == SATURATION_OP],
        [jnp.asarray(draws[k], jnp.float32) for k in ("brightness", "contrast", "saturation")],
        1.0,
    )
    return _blend(planes, anchor, _per_view(factor))  # NO_OP: 0 + 1 (x - 0) = x exactly


def colour_jitter(planes, draws):
    """Returns the planes after brightness, contrast, saturation and hue in the drawn order."""
    order = jnp.asarray(draws["order"])
    slots = jnp.arange(4)
    # Hue, the costly op, once: the blends drawn before it, hue, then the blends after it.
    hue_slot = jnp.min(jnp.where(order == HUE_OP, slots, 4), axis=-1)
    for slot in range(4):
        planes = _blend_slot(planes, jnp.where(slot < hue_slot, order[..., slot], NO_OP), draws)
    planes = _where(hue_slot < 4, adjust_hue(planes, draws["hue"]), planes)
    for slot in range(4):
        planes = _blend_slot(planes, jnp.where(slot > hue_slot, order[..., slot], NO_OP), draws)
    return planes


def _where(condition, a, b):
    return tuple(jnp.where(_per_view(condition), x, y) for x, y in zip(a, b))


def augment_planes(planes, draws):
    """Returns float planes in [0, 1] after jitter, grayscale, blur and solarize as drawn."""
    planes = colour_jitter(planes, draws)
    planes = _where(draws["grayscale"], to_grayscale(planes), planes)
    planes = _where(draws["blur"], gaussian_blur(planes, draws["sigma"]), planes)
    return _where(draws["solarize"], solarize(planes), planes)


def normalise(planes, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=jnp.float32):
    """Returns (x - mean) / std per channel, stacked to (..., S, S, 3) in `dtype`."""
    return jnp.stack([(p - m) / s for p, m, s in zip(planes, mean, std)], axis=-1).astype(dtype)


def augment_views(views, draws=None, *, dtype=jnp.float32, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Returns uint8 views (..., S, S, 3) colour-augmented by `draws` and normalised, in `dtype`.

    `draws` is the dict of one crop group from the pipeline (arrays of leading shape (...),
    "order" (..., 4)); None leaves out the colour ops (normalisation only). Flips are already
    applied by the host. Works on any leading shape, e.g. (B, count); jit it with the step.
    """
    x = jnp.asarray(views).astype(jnp.float32) / 255.0
    planes = (x[..., 0], x[..., 1], x[..., 2])
    if draws is not None:
        planes = augment_planes(planes, draws)
    return normalise(planes, mean, std, dtype)
