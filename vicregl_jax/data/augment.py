"""The colour decisions of each view, drawn on the host, and the normalisation, in TensorFlow.

The pipeline draws each view's colour decisions here (`sample_colour_params`, statelessly from
the view's seed) and sends them with the uint8 views to the accelerator, where `colour.py`
(JAX) applies them inside the train step. `normalise` turns uint8 evaluation images (and the
views of colour="none") into the float32 inputs of the model.
"""

from __future__ import annotations

import tensorflow as tf

from vicregl_jax.data.colour import (
    BLUR_PROBABILITY,
    BLUR_SIGMA,
    BRIGHTNESS,
    CONTRAST,
    GRAYSCALE_PROBABILITY,
    HUE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER_PROBABILITY,
    NO_OP,
    SATURATION,
    SOLARIZE_PROBABILITY,
)


def normalise(x: tf.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tf.Tensor:
    """Returns (x - mean) / std per channel."""
    return (x - tf.constant(mean, x.dtype)) / tf.constant(std, x.dtype)


def sample_colour_params(seed: tf.Tensor, count: int) -> dict[str, tf.Tensor]:
    """Returns the random colour decisions of `count` views, each a (count,) tensor.

    View v is "even" (blur always, never solarize) or "odd" (blur p = 0.1, solarize p = 0.2)
    by the parity of its index v within its crop group. `order` (count, 4) lists the jitter
    ops (BRIGHTNESS_OP...) in the random order of application; NO_OP everywhere when the
    jitter is not applied (p = 0.2).
    """
    u = tf.random.stateless_uniform([count, 13], seed)
    odd = tf.range(count) % 2 == 1
    jitter = u[:, 0] < JITTER_PROBABILITY
    # A uniformly random permutation of the four ops: the ranks of four uniform numbers.
    order = tf.argsort(u[:, 5:9], axis=1, stable=True, direction="ASCENDING")
    order = tf.where(jitter[:, None], order, NO_OP)
    return {
        "order": tf.cast(order, tf.int32),
        "brightness": 1.0 + BRIGHTNESS * (2.0 * u[:, 1] - 1.0),
        "contrast": 1.0 + CONTRAST * (2.0 * u[:, 2] - 1.0),
        "saturation": 1.0 + SATURATION * (2.0 * u[:, 3] - 1.0),
        "hue": HUE * (2.0 * u[:, 4] - 1.0),
        "grayscale": u[:, 9] < GRAYSCALE_PROBABILITY,
        "blur": u[:, 10] < tf.where(odd, BLUR_PROBABILITY[1], BLUR_PROBABILITY[0]),
        "sigma": BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 11],
        "solarize": u[:, 12] < tf.where(odd, SOLARIZE_PROBABILITY[1], SOLARIZE_PROBABILITY[0]),
    }
