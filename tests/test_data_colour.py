"""Host geometry + device colour = the full host chain; decoding only the crop; draw statistics."""
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image

import tf_colour_chain as A
from vicregl_jax.data import CropGroup, ReadOptions, augment_views, colour, crops, make_pretrain_iterator, sources
from vicregl_jax.data.pipeline import (
    _COLOUR,
    _CROP,
    _FLIP,
    _fold,
    decode_covering,
    decode_rgb,
    example_index,
    position_seed,
)

GROUPS = (CropGroup(48, 2, (0.08, 1.0)), CropGroup(32, 3, (0.05, 0.4)))
HOSTS = ReadOptions(process_index=0, process_count=1)


def _jpeg(array, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """8 JPEGs of photos in various encodings (4:2:0, 4:4:4, progressive, grey, odd sizes)
    and a PNG: the pipeline's two decoding paths."""
    folder = tmp_path_factory.mktemp("photos")
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    variants = [
        _jpeg(photos[0][:301, :333], quality=90),
        _jpeg(photos[1], quality=75, subsampling=0),  # 4:4:4
        _jpeg(photos[2][:250], quality=95, progressive=True),
        _jpeg(photos[3][..., 0]),  # grey
        _jpeg(photos[0][17:, 5:], quality=60, subsampling=1),  # 4:2:2
        _jpeg(photos[1][:97, :203]),
        _jpeg(photos[2], quality=85),
    ]
    for k, data in enumerate(variants):
        (folder / f"{k}.jpg").write_bytes(data)
    Image.fromarray(photos[3][:200, :150]).save(folder / "7.png")
    return folder


def _draws(seed, shape):
    count = int(np.prod(shape))
    flat = A.sample_colour_params(tf.constant(seed, tf.int64), count)
    return {k: np.reshape(v.numpy(), (*shape, 4) if k == "order" else shape) for k, v in flat.items()}


def _host_chain(views, draws):
    """The TF host chain (what colour="host" runs), XLA-compiled as in the pipeline."""
    flips = np.zeros(views.shape[:2], bool)
    return tf.function(lambda v, f, d: A.colour_augment(v, f, d), jit_compile=True)(views, flips, draws).numpy()


def _planes(x):
    return tuple(jnp.asarray(x[..., c]) for c in range(3))


@pytest.mark.parametrize("op,value", [
    ("adjust_brightness", 1.3), ("adjust_brightness", 0.65), ("adjust_contrast", 1.35),
    ("adjust_contrast", 0.62), ("adjust_saturation", 1.18), ("adjust_saturation", 0.81),
    ("adjust_hue", 0.07), ("adjust_hue", -0.093), ("gaussian_blur", 0.3), ("gaussian_blur", 1.9),
])
def test_each_device_op_equals_the_host_op_to_float_rounding(op, value):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.random((2, 24, 24, 3)), np.asarray(
        Image.fromarray(skimage.data.astronaut()).resize((24, 24)))[None] / 255.0]).astype(np.float32)
    host_op = tf.function(lambda t: getattr(A, op)(t, value), jit_compile=True)
    want = np.stack([host_op(tf.constant(view)).numpy() for view in x])  # the host op works per view
    got = np.stack(getattr(colour, op)(_planes(x), value), -1)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_grayscale_solarize_and_normalisation_equal_the_host_ops():
    x = np.random.default_rng(1).random((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(np.stack(colour.to_grayscale(_planes(x)), -1), A.to_grayscale(tf.constant(x)).numpy(),
                               atol=1e-7)
    np.testing.assert_array_equal(np.stack(colour.solarize(_planes(x)), -1), A.solarize(tf.constant(x)).numpy())
    np.testing.assert_allclose(np.asarray(colour.normalise(_planes(x))), A.normalise(tf.constant(x)).numpy(), atol=1e-6)


@pytest.mark.parametrize("case", ["drawn", "every_op_forced"])
def test_device_chain_equals_host_chain_on_the_same_draws(case):
    """The whole chain, vectorised over (B, V), each view with its own draws, per view parity."""
    rng = np.random.default_rng(2)
    photo = np.asarray(Image.fromarray(skimage.data.coffee()).resize((32, 32)))
    views = np.stack([photo, photo[:, ::-1], rng.integers(0, 256, (32, 32, 3)).astype(np.uint8),
                      np.full((32, 32, 3), 200, np.uint8)])[None].repeat(4, 0)  # (4, 4, 32, 32, 3)
    draws = _draws([5, 6], (4, 4))
    if case == "every_op_forced":  # flips are the host's; grayscale, blur and solarize on and off
        draws["grayscale"][:] = [[True, False, True, False]] * 4
        draws["blur"][:2] = True
        draws["solarize"][::2] = True
        draws["order"][0] = [[3, 2, 1, 0]] * 4
    want = _host_chain(views, draws)
    for dtype, atol in ((jnp.float32, 5e-6), (jnp.bfloat16, 0.02)):
        got = jax.jit(augment_views, static_argnames="dtype")(views, draws, dtype=dtype)
        assert got.dtype == dtype and got.shape == views.shape
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=atol, rtol=atol)


def _reference_views(encoded, position, seed, groups):
    """The views as the release makes them, from the same draws: PIL decodes the whole image,
    crops, resizes (bicubic) and mirrors."""
    image = Image.open(io.BytesIO(encoded)).convert("RGB")
    seed_p = position_seed(tf.constant(position, tf.int64), seed)
    out = []
    for k, group in enumerate(groups):
        group_seed = _fold(seed_p, k)
        boxes = crops.sample_crop_boxes(_fold(group_seed, _CROP), image.height, image.width,
                                        group.count, group.scale).numpy()
        flips = crops.sample_flips(_fold(group_seed, _FLIP), group.count).numpy()
        views = []
        for (top, left, h, w), flip in zip(boxes, flips):
            view = image.crop((left, top, left + w, top + h)).resize((group.size, group.size), Image.BICUBIC)
            views.append(np.asarray(view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view))
        out.append(np.stack(views))
    return out


@pytest.mark.parametrize("resize", ["pillow", "tensorflow"])
def test_views_are_pillows_from_the_whole_decoded_image(photo_folder, resize):
    """Decoding only the crops' region (JPEG; PNGs decode whole) and resizing with the compiled
    kernel gives the bytes of the release's chain: PIL decodes everything, crops, resizes,
    mirrors. TensorFlow's resize (resize="tensorflow") is within a level almost everywhere."""
    it = make_pretrain_iterator(f"folder:{photo_folder}", "train", groups=GROUPS, stride=16,
                                global_batch_size=8, seed=9, read=dataclasses.replace(HOSTS, resize=resize))
    batch = next(it)
    it.close()

    source = sources.open_source(f"folder:{photo_folder}", "train")
    for slot in range(8):
        index = int(example_index(tf.constant(slot, tf.int64), 8, 9, shuffle=True))
        encoded = open(source.describe(index), "rb").read()
        for got, want in zip((v[slot] for v in batch["views"]), _reference_views(encoded, slot, 9, GROUPS)):
            if resize == "pillow":
                np.testing.assert_array_equal(got, want)
            else:
                diff = np.abs(got.astype(int) - want)
                assert np.percentile(diff, 99) <= 1 and diff.max() <= 12, (diff.max(), slot)


def test_decode_and_crop_is_bit_identical_to_decode_then_crop(photo_folder):
    """As the pipeline decodes a JPEG's region (with a block of margin, then cut): the same
    pixels as decoding the whole image; without the margin they differ (chroma upsampling)."""
    rng = np.random.default_rng(3)
    differs = 0
    for path in sorted(photo_folder.glob("*.jpg")):
        encoded = tf.constant(path.read_bytes())
        whole = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE").numpy()
        height, width = whole.shape[:2]
        np.testing.assert_array_equal(tf.image.extract_jpeg_shape(encoded).numpy()[:2], [height, width])
        for _ in range(12):
            h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            box = [[top, left, h, w]]
            _, region, region_top, region_left = decode_covering(
                encoded, lambda *_: tf.constant(box, tf.int32), "INTEGER_ACCURATE")
            assert (int(region_top), int(region_left)) == (top, left)
            np.testing.assert_array_equal(region.numpy(), whole[top : top + h, left : left + w],
                                          err_msg=f"{path} {top, left, h, w}")
            bare = tf.image.decode_and_crop_jpeg(encoded, [top, left, h, w], channels=3,
                                                 dct_method="INTEGER_ACCURATE").numpy()
            differs += not np.array_equal(bare, whole[top : top + h, left : left + w])
    assert differs > 0  # the margin is needed: the test would catch its removal


def test_jpeg_decoding_matches_pil_by_default(photo_folder):
    for path in sorted(photo_folder.glob("*.jpg")):
        ours = decode_rgb(tf.constant(path.read_bytes())).numpy()
        pil = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(ours, pil, err_msg=str(path))


def test_draw_statistics_per_view_index_within_each_group():
    """Over many images: blur p = 1 / 0.1 and solarize p = 0 / 0.2 by the parity of the view's
    index within its group; jitter p = 0.8 and grayscale p = 0.2 for every view."""
    groups = (CropGroup(8, 2, (0.5, 1.0)), CropGroup(8, 3, (0.5, 1.0)))

    n = 4000
    for k, group in enumerate(groups):
        # The pipeline's seeds: position -> group k -> colour.
        draws = tf.data.Dataset.range(n).map(
            lambda p: A.sample_colour_params(_fold(_fold(position_seed(p, 0), k), _COLOUR), group.count))
        draws = next(iter(draws.batch(n)))
        draws = {key: v.numpy() for key, v in draws.items()}
        for v in range(group.count):
            odd = v % 2
            tol = 5 * np.sqrt(0.25 / n)
            assert abs(draws["blur"][:, v].mean() - colour.BLUR_PROBABILITY[odd]) <= tol
            assert abs(draws["solarize"][:, v].mean() - colour.SOLARIZE_PROBABILITY[odd]) <= tol
            assert abs((draws["order"][:, v, 0] != colour.NO_OP).mean() - 0.8) <= tol
            assert abs(draws["grayscale"][:, v].mean() - 0.2) <= tol
        assert draws["blur"][:, 0::2].all() and not draws["solarize"][:, 0::2].any()
