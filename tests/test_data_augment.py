"""The colour draws (the release's probabilities, ranges and per-view parity), the normalisation
constants, and TensorFlow's resize (config.data.resize="tensorflow") against PIL's.

The colour ops themselves run on the devices and are compared with PIL in test_data_colour.py."""

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image

from vicregl_jax.data import IMAGENET_MEAN, IMAGENET_STD
from vicregl_jax.data import augment as A
from vicregl_jax.data.images import resize, to_uint8

DRAWS = 20000  # views per parity below: 10000; 5 standard errors of a rate p are < 0.02


@pytest.fixture(scope="module")
def params():
    return {k: v.numpy() for k, v in A.sample_colour_params(tf.constant([7, 8], tf.int64), DRAWS).items()}


def test_blur_and_solarize_have_the_per_view_parity_of_the_release(params):
    even, odd = slice(0, None, 2), slice(1, None, 2)
    assert params["blur"][even].mean() == 1.0
    assert abs(params["blur"][odd].mean() - 0.1) < 0.015
    assert params["solarize"][even].mean() == 0.0
    assert abs(params["solarize"][odd].mean() - 0.2) < 0.02


def test_jitter_and_grayscale_probabilities_and_ranges(params):
    jittered = params["order"][:, 0] != A.NO_OP
    assert abs(jittered.mean() - 0.8) < 0.02
    assert (params["order"][~jittered] == A.NO_OP).all()
    # Each jittered view applies every op once, in a uniformly random order.
    orders = params["order"][jittered]
    np.testing.assert_array_equal(np.sort(orders, axis=1), np.tile([0, 1, 2, 3], (len(orders), 1)))
    for slot in range(4):
        counts = np.bincount(orders[:, slot], minlength=4) / len(orders)
        np.testing.assert_allclose(counts, 0.25, atol=0.02)
    assert abs(params["grayscale"].mean() - 0.2) < 0.02
    for key, lo, hi in [
        ("brightness", 0.6, 1.4),
        ("contrast", 0.6, 1.4),
        ("saturation", 0.8, 1.2),
        ("hue", -0.1, 0.1),
        ("sigma", 0.1, 2.0),
    ]:
        values = params[key]
        assert values.min() >= lo and values.max() <= hi
        assert abs(values.mean() - (lo + hi) / 2) < 0.02 * (hi - lo)  # uniform
        assert abs(values.std() - (hi - lo) / np.sqrt(12)) < 0.02 * (hi - lo)


def test_decisions_are_a_pure_function_of_the_seed():
    a = A.sample_colour_params(tf.constant([1, 2], tf.int64), 8)
    b = A.sample_colour_params(tf.constant([1, 2], tf.int64), 8)
    c = A.sample_colour_params(tf.constant([1, 3], tf.int64), 8)
    np.testing.assert_array_equal(a["sigma"], b["sigma"])
    assert not np.array_equal(a["sigma"], c["sigma"])


def test_normalisation_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.228, 0.224, 0.225)  # 0.228 for red, as the release
    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    out = A.normalise(tf.constant(x)).numpy()
    np.testing.assert_allclose(out, (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("box,size", [((10, 20, 300, 310), 64), ((50, 60, 40, 30), 64), ((0, 0, 512, 512), 96)])
def test_crop_resize_matches_pil_bicubic_but_at_the_sharpest_edges(box, size):
    # PIL rounds and clips to uint8 between its horizontal and vertical passes, TF does not:
    # equal within a level almost everywhere, a few levels apart where overshoots were clipped.
    image = skimage.data.astronaut()
    top, left, h, w = box
    crop = image[top : top + h, left : left + w]
    ours = to_uint8(resize(tf.constant(crop), [size, size])).numpy().astype(int)
    pil = np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC)).astype(int)
    diff = np.abs(ours - pil)
    assert np.percentile(diff, 99) <= 1 and diff.mean() < 0.2 and diff.max() <= 12, (diff.max(), diff.mean())
