"""The device colour chain gives PIL's bytes (torchvision's ops on PIL images, on the same draws);
decoding only the crop; draw statistics."""

import dataclasses
import io
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image

from references import pil as reference_pil
from vicregl_jax.data import CropGroup, ReadOptions, augment_views, colour, crops, make_pretrain_iterator, sources
from vicregl_jax.data import augment as A
from vicregl_jax.data.images import decode_covering, decode_rgb
from vicregl_jax.data.stream import fold as _fold
from vicregl_jax.data.views import COLOUR_SALT, CROP_SALT, FLIP_SALT, example_index, position_seed

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


SIZES = (224, 96, 37)  # the recipes' crops and an odd size
FAMILIES = (
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "jitter",
    "grayscale",
    "blur_small",
    "blur_large",
    "solarize",
    "chain",
)
PER_FAMILY = {224: 4, 96: 24, 37: 12}  # 24 at 96: the jitter family runs every order once there


def _test_views(rng, count, size):
    """Returns uint8 views (count, S, S, 3): crops of photos, flipped ones, noise, and flat or
    two-level views (greys, primaries, the hue's ties)."""
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    out = []
    for i in range(count):
        kind = i % 5
        if kind == 3:
            out.append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        elif kind == 4:
            levels = rng.choice([0, 1, 127, 128, 254, 255], (2, 3))
            out.append(np.where(rng.random((size, size, 1)) < 0.5, levels[0], levels[1]).astype(np.uint8))
        else:
            photo = photos[i % 3]
            top, left = rng.integers(0, 120, 2)
            side = rng.integers(size // 2 + 1, 300)
            crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
            out.append(np.asarray(crop)[:, ::-1] if kind == 1 else np.asarray(crop))
    return np.stack(out)


def _family_draws(family, count, rng):
    """Returns the draws of `count` views (the pipeline's format) with only `family`'s ops on; the
    whole chain with the release's probabilities for "chain"; the ranges' ends come first."""

    def ends(lo, hi):
        values = rng.uniform(lo, hi, count)
        values[:2] = lo, hi
        return values.astype(np.float32)

    none = np.zeros(count, bool)
    draws = {
        "order": np.full((count, 4), colour.NO_OP, np.int32),
        "grayscale": none,
        "blur": none,
        "solarize": none,
        "brightness": ends(1 - colour.BRIGHTNESS, 1 + colour.BRIGHTNESS),
        "contrast": ends(1 - colour.CONTRAST, 1 + colour.CONTRAST),
        "saturation": ends(1 - colour.SATURATION, 1 + colour.SATURATION),
        "hue": ends(-colour.HUE, colour.HUE),
        "sigma": ends(*colour.BLUR_SIGMA),
    }
    ops = ("brightness", "contrast", "saturation", "hue")
    if family in ops:
        draws["order"][:, 0] = ops.index(family)
    elif family == "jitter":
        draws["order"][:] = np.array(list(itertools.permutations(range(4))))[np.arange(count) % 24]
    elif family == "grayscale":
        draws["grayscale"] = ~none
    elif family.startswith("blur"):
        draws["blur"] = ~none
        draws["sigma"] = ends(0.1, 0.5) if family == "blur_small" else ends(0.5, 2.0)
        if family == "blur_small":
            draws["sigma"][1] = np.nextafter(np.float32(0.5), np.float32(0))
    elif family == "solarize":
        draws["solarize"] = ~none
    else:  # the chain, as the release draws it per view
        jitter = rng.random(count) < colour.JITTER_PROBABILITY
        draws["order"] = np.where(jitter[:, None], np.argsort(rng.random((count, 4)), 1), colour.NO_OP).astype(np.int32)
        draws["grayscale"] = rng.random(count) < colour.GRAYSCALE_PROBABILITY
        draws["blur"] = rng.random(count) < 0.5
        draws["solarize"] = rng.random(count) < 0.3
    return draws


@pytest.fixture(scope="module")
def compared():
    """{(size, family): (device views, PIL views, draws)}: one compiled chain per size over the
    views of every family (each view with its own draws), and the PIL reference per view."""
    rng = np.random.default_rng(7)
    chain = jax.jit(colour.colour_views)
    out = {}
    for size in SIZES:
        n = PER_FAMILY[size]
        views = _test_views(rng, n * len(FAMILIES), size)
        per_family = [_family_draws(family, n, rng) for family in FAMILIES]
        draws = {k: np.concatenate([d[k] for d in per_family]) for k in per_family[0]}
        got = np.asarray(chain(views, draws))
        for k, family in enumerate(FAMILIES):
            part = slice(k * n, (k + 1) * n)
            want = np.stack(
                [
                    reference_pil.pil_colour(views[i], {key: v[i] for key, v in draws.items()})
                    for i in range(part.start, part.stop)
                ]
            )
            out[size, family] = got[part], want, {key: v[part] for key, v in draws.items()}
    return out


def _differences(got, want):
    diff = got.astype(np.int32) - want
    return (
        f"mean abs {np.abs(diff).mean():.4f}, signed mean {diff.mean():+.4f}, "
        f"99.9th pct {np.percentile(np.abs(diff), 99.9):.1f}, max {np.abs(diff).max()}"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_colour_ops_give_pils_bytes(compared, family):
    """Each op family (and the whole chain) at 224, 96 and an odd size: the bytes of torchvision's
    ops on PIL images with the same draws (within the release's limits of 0.25 mean and 2 levels
    at the 99.9th percentile a fortiori)."""
    for size in SIZES:
        got, want, draws = compared[size, family]
        for i in range(len(got)):
            np.testing.assert_array_equal(
                got[i],
                want[i],
                err_msg=f"{family} at {size}: {_differences(got[i], want[i])}; draws "
                + str({k: v[i] for k, v in draws.items()}),
            )


def test_the_comparison_covers_every_jitter_order_and_both_blur_ranges(compared):
    orders = {tuple(o) for size in SIZES for o in compared[size, "jitter"][2]["order"]}
    assert orders == set(itertools.permutations(range(4)))
    small = np.concatenate([compared[size, "blur_small"][2]["sigma"] for size in SIZES])
    large = np.concatenate([compared[size, "blur_large"][2]["sigma"] for size in SIZES])
    assert small.max() < 0.5 <= large.min() and small.min() == np.float32(0.1) and large.max() == np.float32(2.0)
    # The box radius is 0 below sigma ~0.87 and 1 above: both kinds of box were blurred.
    assert {int(colour._box_radius_numpy(s)) for s in np.concatenate([small, large])} == {0, 1}


@pytest.mark.parametrize("size", [1, 2, 3])
def test_blur_of_views_smaller_than_the_box_equals_pil(size):
    """Pillow's edge branches: views narrower than the box and its two far taps (< 4 pixels)."""
    rng = np.random.default_rng(size)
    views = rng.integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    sigma = np.array([0.1, 0.49, 0.8, 1.2, 1.7, 2.0], np.float32)
    got = colour.from_planes(jax.jit(colour.gaussian_blur)(colour.to_planes(views), sigma))
    for view, s, g in zip(views, sigma, np.asarray(got)):
        np.testing.assert_array_equal(g, np.asarray(reference_pil.pil_blur(Image.fromarray(view), float(s))))


def test_blend_equals_pil_blend_on_every_pair_of_levels():
    """PIL's Image.blend (ImageEnhance's core) for every (anchor, value) pair of levels, factors
    inside [0, 1] (PIL truncates) and outside (it clips), the jitter's range's ends included."""
    anchor, value = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    factors = np.concatenate(
        [[0.0, 1.0, 0.5, 0.6, 1.4, 0.8, 1.2, 2.0, 1 / 3], np.random.default_rng(3).uniform(0.55, 1.45, 40)]
    ).astype(np.float32)
    blend = jax.jit(jax.vmap(lambda f: colour._blend(jnp.asarray(value)[None], jnp.asarray(anchor)[None], f)))
    got = np.asarray(blend(factors))[:, 0]
    for f, g in zip(factors, got):
        want = Image.blend(Image.fromarray(anchor.astype(np.uint8)), Image.fromarray(value.astype(np.uint8)), float(f))
        np.testing.assert_array_equal(g, np.asarray(want), err_msg=f"factor {f}")


def test_hue_luma_and_contrast_mean_equal_pil_on_random_colours():
    """PIL's 8-bit HSV round trip with the hue shifted as torchvision shifts it, its luma (convert
    "L") and Contrast's rounded mean, on 2^18 random colours and every grey (all 2^24 colours:
    benchmarks/colour_fidelity.py --exhaustive-hue)."""
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    image[0, :256] = np.arange(256)[:, None]
    pil = Image.fromarray(image)
    planes = colour.to_planes(image)
    hue = jax.jit(colour.adjust_hue)
    for delta in np.array([0.1, -0.0039, 0.0472], np.float32):
        np.testing.assert_array_equal(
            np.asarray(colour.from_planes(hue(planes, delta))),
            np.asarray(reference_pil.pil_hue(pil, float(delta))),
            err_msg=f"hue {delta}",
        )
    np.testing.assert_array_equal(np.asarray(colour.luma(planes)), np.asarray(pil.convert("L")))
    for contrast in (0.6, 1.37):
        np.testing.assert_array_equal(
            np.asarray(colour.from_planes(colour.adjust_contrast(planes, contrast))),
            np.asarray(reference_pil.pil_contrast(pil, contrast)),
        )


def test_per_view_scalars_are_rounded_as_pillows_c():
    """The box radius of sigma (float32 steps, the root in double) and every division correctly
    rounded (XLA's float32 division on CPU is not), against numpy's IEEE arithmetic."""
    rng = np.random.default_rng(5)
    sigma = np.concatenate([rng.uniform(*colour.BLUR_SIGMA, 4000), np.linspace(0.1, 2.0, 1001)]).astype(np.float32)
    radius = np.array([colour._box_radius_numpy(s) for s in sigma], np.float32)
    r, ww, fw = (np.asarray(a) for a in jax.jit(colour.box_weights)(sigma))
    np.testing.assert_array_equal(r, radius.astype(np.int32))
    quotient = np.float32(1 << 24) / (radius * np.float32(2) + np.float32(1))
    np.testing.assert_array_equal(ww, quotient.astype(np.uint32))
    np.testing.assert_array_equal(fw, ((1 << 24) - (2 * r.astype(np.int64) + 1) * ww) // 2)
    a, b = rng.uniform(-50, 50, (2, 100000)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(colour._divide)(a, b)), a / b)
    assert np.array_equal(np.asarray(jax.jit(colour.hue_shift)(a / 500)), np.trunc((a / 500).astype(np.float64) * 255))


def test_augment_views_normalises_pils_bytes_of_the_pipelines_batch(photo_folder):
    """End to end: the pipeline's uint8 views and draws; augment_views = the release's ToTensor +
    Normalize of the PIL chain's views (the first crop group in float32, the second in bfloat16)."""
    it = make_pretrain_iterator(
        f"folder:{photo_folder}", "train", groups=GROUPS, stride=16, global_batch_size=8, seed=4, read=HOSTS
    )
    batch = next(it)
    it.close()
    mean, std = np.float32(colour.IMAGENET_MEAN), np.float32(colour.IMAGENET_STD)
    for views, draws, (dtype, atol) in zip(batch["views"], batch["draws"], ((jnp.float32, 1e-6), (jnp.bfloat16, 0.02))):
        flat = {k: np.reshape(v, (-1, 4) if k == "order" else (-1,)) for k, v in draws.items()}
        pil = np.stack(
            [
                reference_pil.pil_colour(view, {k: v[i] for k, v in flat.items()})
                for i, view in enumerate(views.reshape(-1, *views.shape[2:]))
            ]
        ).reshape(views.shape)
        want = (pil.astype(np.float32) / np.float32(255) - mean) / std
        got = jax.jit(augment_views, static_argnames="dtype")(views, draws, dtype=dtype)
        assert got.dtype == dtype and got.shape == views.shape
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=atol, rtol=0.01 if atol > 1e-6 else 0)


def test_a_view_with_a_non_finite_draw_comes_out_nan():
    """The chain is integer-valued: a NaN or infinite factor or sigma would become some level, so
    that view (only it) is NaN, for the train step's finiteness check."""
    draws = _family_draws("chain", 6, np.random.default_rng(6))
    for i, key in enumerate(("brightness", "contrast", "saturation", "hue", "sigma")):
        draws[key][i] = np.nan if i % 2 == 0 else np.inf
    out = np.asarray(jax.jit(augment_views)(np.zeros((6, 4, 4, 3), np.uint8), draws))
    assert np.isnan(out).reshape(6, -1).all(1).tolist() == [True] * 5 + [False]
    assert np.isfinite(out[5]).all()


def _reference_views(encoded, position, seed, groups):
    """The views as the release makes them, from the same draws: PIL decodes the whole image,
    crops, resizes (bicubic) and mirrors."""
    image = Image.open(io.BytesIO(encoded)).convert("RGB")
    seed_p = position_seed(tf.constant(position, tf.int64), seed)
    out = []
    for k, group in enumerate(groups):
        group_seed = _fold(seed_p, k)
        boxes = crops.sample_crop_boxes(
            _fold(group_seed, CROP_SALT), image.height, image.width, group.count, group.scale
        ).numpy()
        flips = crops.sample_flips(_fold(group_seed, FLIP_SALT), group.count).numpy()
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
    it = make_pretrain_iterator(
        f"folder:{photo_folder}",
        "train",
        groups=GROUPS,
        stride=16,
        global_batch_size=8,
        seed=9,
        read=dataclasses.replace(HOSTS, resize=resize),
    )
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
                encoded, lambda *_: tf.constant(box, tf.int32), "INTEGER_ACCURATE"
            )
            assert (int(region_top), int(region_left)) == (top, left)
            np.testing.assert_array_equal(
                region.numpy(), whole[top : top + h, left : left + w], err_msg=f"{path} {top, left, h, w}"
            )
            bare = tf.image.decode_and_crop_jpeg(
                encoded, [top, left, h, w], channels=3, dct_method="INTEGER_ACCURATE"
            ).numpy()
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
            lambda p: A.sample_colour_params(_fold(_fold(position_seed(p, 0), k), COLOUR_SALT), group.count)
        )
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
