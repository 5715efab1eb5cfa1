"""The compiled resize equals Pillow's, byte for byte (bicubic and bilinear, up and down, windows)."""

import pathlib

import numpy as np
import PIL
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image

from vicregl_jax.data import resample
from vicregl_jax.data.pipeline import centre_view

PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
PINNED_PILLOW = "13.0.0"  # requirements.txt; the Pillow whose bytes the compiled resize reproduces


def test_the_installed_pillow_is_the_one_the_kernel_reproduces():
    """The kernel gives Pillow 13's bytes, which these tests compare with: Pillow 11 and 12 resize
    tall crops in the other pass order (a level apart at some pixels)."""
    pins = pathlib.Path(__file__).parents[1].joinpath("requirements.txt").read_text().splitlines()
    assert f"pillow=={PINNED_PILLOW}" in pins, "requirements.txt no longer pins the Pillow this test names"
    major = PIL.__version__.split(".")[0]
    assert major == PINNED_PILLOW.split(".")[0], (
        f"Pillow {PIL.__version__} is installed, but the compiled resize (vicregl_jax/data/resample.py) reproduces "
        f"Pillow {PINNED_PILLOW}'s bytes: pip install pillow=={PINNED_PILLOW} (Pillow 11 and 12 differ by a level "
        "on some pixels of tall crops, so the byte-for-byte tests below would fail)"
    )


def _pillow(image, height, width, method):
    return np.asarray(Image.fromarray(image).resize((width, height), PIL_FILTERS[method]))


def _vertical_first(h, w, height, width):
    """The pass order of the pinned Pillow (13): vertical first when the height shrinks by more
    than twice as many pixels as the width."""
    return width != w and height < h and h - height > 2 * (w - width)


def test_random_sizes_equal_pillow_byte_for_byte():
    """Random crops of a photo and of noise (noise has the most overshoot to clip), every
    branch: both passes in either order, one pass only, no pass (a copy), up- and downscaling."""
    rng = np.random.default_rng(0)
    photo = skimage.data.astronaut()
    noise = rng.integers(0, 256, (420, 430, 3), dtype=np.uint8)
    branches = set()
    for i in range(240):
        source = photo if i % 2 else noise
        h, w = rng.integers(1, 400, 2)
        height, width = rng.integers(1, 300, 2)
        if i % 5 == 0:
            height = h
        if i % 7 == 0:
            width = w
        method = "bilinear" if i % 3 == 0 else "bicubic"
        top, left = rng.integers(0, 20, 2)
        image = source[top : top + h, left : left + w]  # a strided view, as the pipeline's crops
        want = _pillow(np.ascontiguousarray(image), height, width, method)
        got = resample.resize(image, height, width, method)
        np.testing.assert_array_equal(got, want, err_msg=f"{image.shape} -> {(height, width)} {method}")
        branches.add((height == h, width == w, _vertical_first(h, w, height, width)))
    # Both orders, and each single pass, were exercised.
    assert {(False, False, False), (False, False, True), (True, False, False), (False, True, False)} <= branches


@pytest.mark.parametrize(
    "shape,size",
    [
        ((100, 90), (96, 96)),
        ((392, 282), (120, 160)),
        ((304, 385), (45, 222)),
        ((200, 150), (100, 100)),
        ((375, 500), (224, 224)),
        ((60, 40), (224, 224)),
        ((2, 3), (1, 1)),
    ],
)
def test_known_shapes_including_both_pass_orders_equal_pillow(shape, size):
    """(100, 90) -> (96, 96): vertical first; (200, 150) -> (100, 100): the tie, horizontal first."""
    image = skimage.data.coffee()[: shape[0], : shape[1]]
    for method in resample.FILTERS:
        np.testing.assert_array_equal(resample.resize(image, *size, method), _pillow(image, *size, method))


def test_windows_are_the_same_pixels_as_the_whole_resize():
    rng = np.random.default_rng(1)
    photo = skimage.data.chelsea()
    for _ in range(40):
        h, w = rng.integers(20, 300, 2)
        height, width = rng.integers(8, 300, 2)
        whole = _pillow(photo[:h, :w], height, width, "bilinear")
        top, left = rng.integers(0, height), rng.integers(0, width)
        wh, ww = rng.integers(1, height - top + 1), rng.integers(1, width - left + 1)
        got = resample.resize(photo[:h, :w], height, width, "bilinear", window=(top, left, wh, ww))
        np.testing.assert_array_equal(got, whole[top : top + wh, left : left + ww])


def test_crop_resize_crops_resizes_and_flips_as_pillow():
    region = skimage.data.astronaut()[50:350, 20:420]
    boxes = np.array([[0, 0, 300, 400], [10, 30, 57, 41], [120, 200, 180, 150], [5, 6, 1, 2]], np.int32)
    flips = np.array([False, True, True, False])
    views = resample.crop_resize(region, boxes, flips, 64, resample.FILTERS["bicubic"])
    assert views.shape == (4, 64, 64, 3) and views.dtype == np.uint8
    for view, (top, left, h, w), flip in zip(views, boxes, flips):
        pil = Image.fromarray(np.ascontiguousarray(region[top : top + h, left : left + w])).resize(
            (64, 64), Image.BICUBIC
        )
        if flip:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        np.testing.assert_array_equal(view, np.asarray(pil))


def test_coefficients_sum_to_one_and_stay_inside_the_image():
    for in_size, out_size in ((300, 224), (90, 96), (7, 1), (1, 5)):
        for kind in resample.FILTERS.values():
            bounds, weights = resample.coefficients(in_size, out_size, kind)
            assert (bounds[:, 0] >= 0).all() and (bounds.sum(1) <= in_size).all() and (bounds[:, 1] >= 1).all()
            # Each output's integer weights sum to 1 in 22 fractional bits, within their rounding.
            assert np.abs(weights.sum(1) - (1 << 22)).max() <= weights.shape[1]


@pytest.mark.parametrize(
    "args,pattern",
    [
        ((np.zeros((4, 4, 3), np.float32), 2, 2), r"image of dtype float32 .* give uint8 \(H, W, 3\)"),
        ((np.zeros((4, 4), np.uint8), 2, 2), r"shape \(4, 4\).* give uint8 \(H, W, 3\)"),
        ((np.zeros((4, 4, 3), np.uint8), 0, 2), r"to \(0, 2\): sizes must be >= 1"),
        ((np.zeros((4, 4, 3), np.uint8), 2, 2, "lanczos"), r"method='lanczos': use one of \('bicubic', 'bilinear'\)"),
        (
            (np.zeros((4, 4, 3), np.uint8), 2, 2, "bicubic", (1, 1, 2, 1)),
            r"window=\(1, 1, 2, 1\): give .* inside the \(2, 2\)",
        ),
    ],
)
def test_bad_arguments_are_named(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        resample.resize(*args)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_evaluation_view_is_torchvisions_resize_and_centre_crop_in_pillow(method):
    """centre_view (evaluation): short side to 256 (long side int(256 * long / short)) and the
    centre 224, as torchvision's Resize + CenterCrop on a PIL image, byte for byte."""
    for image in (skimage.data.astronaut()[:301, :433], skimage.data.coffee()[:, :250], skimage.data.chelsea()):
        h, w = image.shape[:2]
        short, long = min(h, w), max(h, w)
        size = (256, int(256 * long / short)) if h <= w else (int(256 * long / short), 256)
        resized = _pillow(image, *size, method)
        top, left = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
        got = centre_view(tf.constant(image), 224, 256, method).numpy()
        np.testing.assert_array_equal(got, resized[top : top + 224, left : left + 224])
        approx = centre_view(tf.constant(image), 224, 256, method, impl="tensorflow").numpy()
        assert np.abs(approx.astype(int) - got).mean() < 0.5
