"""The colour augmentations of the release's views and the normalisation, in JAX, with PIL's bytes.

The hosts send uint8 views and, per view, the random draws of the colour chain (see
`vicregl_jax.data.augment.sample_colour_params`); `augment_views` applies them inside the
jitted train step, on the batch sharded over the devices:

    views = tuple(colour.augment_views(v, d, dtype=jnp.bfloat16)
                  for v, d in zip(batch["views"], batch["draws"]))

Each op computes what the release computes on PIL images (torchvision's functional ops on
Pillow 13), to the byte: every op returns 8-bit values, as PIL's images are.

- brightness, contrast, saturation: PIL's blend a + f (x - a) in float32, truncated to 8 bits
  and clipped, with a = 0, the view's mean 8-bit luma rounded to an integer, or each pixel's
  8-bit luma; the product f (x - a) is formed from two exact halves of f, so that a fused
  multiply-add cannot change its rounding.
- hue: PIL's 8-bit HSV (its float arithmetic, tabulated once over all 8-bit inputs), the hue
  shifted by int(255 d) levels modulo 256 (torchvision), back to RGB with PIL's rounding,
  computed exactly from the tabulated factors.
- grayscale: PIL's integer luma (19595 R + 38470 G + 7471 B + 2^15) >> 16.
- Gaussian blur: PIL's extended box blur: box radius from sigma as Pillow derives it for
  three passes, three horizontal then three vertical passes in integer arithmetic (24-bit
  fixed-point weights, edges replicated, each pass rounded to 8 bits).
- solarize: x -> 255 - x where x >= 128.

Everything is elementwise, a short stencil, or reduces over the pixels of one view, so a batch
sharded along its first axis stays sharded with no communication. The views are handled as
(..., 3, S, S) planes: the last axis is a row of pixels, not 3 channels, which TPUs lay out
without padding. Importable without TensorFlow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
# The release normalises red with std 0.228, not the usual ImageNet 0.229 (its
# transforms.py); the pre-trained weights expect it, so we keep it.
IMAGENET_STD = (0.228, 0.224, 0.225)

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# PIL's 8-bit luma: (R, G, B) . LUMA_FIXED + 2^15 >> 16 (ITU-R 601-2 in 16-bit fixed point).
LUMA_FIXED = (19595, 38470, 7471)

# Colour jitter of the release: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1.
JITTER_PROBABILITY = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
GRAYSCALE_PROBABILITY = 0.2
BLUR_SIGMA = (0.1, 2.0)
BLUR_PASSES = 3  # PIL's GaussianBlur: three box blurs per axis
BLUR_RADIUS = 6  # taps on each side of a sampled Gaussian of the largest sigma (TensorFlow's host chain)
# (even-indexed view, odd-indexed view) probabilities; the index counts within a crop group.
BLUR_PROBABILITY = (1.0, 0.1)
SOLARIZE_PROBABILITY = (0.0, 0.2)
SOLARIZE_LEVEL = 128
SOLARIZE_THRESHOLD = SOLARIZE_LEVEL / 255.0

# Indices of the jitter ops in draws["order"]; NO_OP marks views without jitter.
BRIGHTNESS_OP, CONTRAST_OP, SATURATION_OP, HUE_OP, NO_OP = range(5)

# The draws of one view and their dtypes: "order" is (..., 4), the others (...).
DRAW_KEYS = ("order", "brightness", "contrast", "saturation", "hue", "grayscale", "blur", "sigma", "solarize")
_FACTORS = ("brightness", "contrast", "saturation", "hue", "sigma")  # the float draws


def _hsv_tables():
    """Returns PIL's RGB -> HSV hue (3 x 256 x 256, by the maximal channel and the two others'
    distances to it) and saturation (256 x 256, by spread and maximum), and per (s, h) the
    factors x of its HSV -> RGB rounding round(v (1 - x)): (fs, fs f, fs (1 - f) high, low)."""
    d = np.arange(256)
    d1, d2 = np.meshgrid(d, d, indexing="ij")
    spread = np.maximum(d1, d2).astype(np.float32)
    safe = np.where(spread > 0, spread, np.float32(1))
    c1, c2 = d1.astype(np.float32) / safe, d2.astype(np.float32) / safe  # float32 quotients, as PIL
    cases = (
        c2 - c1,  # red maximal: distances (green, blue), h = bc - gc in float
        (2.0 + c1.astype(np.float64) - c2).astype(np.float32),  # green: (red, blue), in double
        (4.0 + c1.astype(np.float64) - c2).astype(np.float32),
    )  # blue: (green, red)
    hue = []
    for h in cases:
        h = np.fmod(h.astype(np.float64) / 6.0 + 1.0, 1.0).astype(np.float32)
        hue.append(np.where(spread > 0, np.clip((h.astype(np.float64) * 255.0).astype(np.int64), 0, 255), 0))
    sat = d1.astype(np.float32) / np.where(d2 > 0, d2, 1).astype(np.float32)  # (spread, maximum)
    sat = np.clip((sat.astype(np.float64) * 255.0).astype(np.int64), 0, 255)
    sixths = d.astype(np.float32).astype(np.float64) * 6.0 / 255.0
    f = (sixths - np.floor(sixths)).astype(np.float32)
    fs = (d.astype(np.float32).astype(np.float64) / 255.0).astype(np.float32)
    fs_, f_ = np.meshgrid(fs, f, indexing="ij")  # (s, h)
    t = fs_.astype(np.float64) * (1.0 - f_.astype(np.float64))  # in double, as PIL
    t_high = t.astype(np.float32)
    factors = np.stack([fs_, fs_ * f_, t_high, (t - t_high).astype(np.float32)], -1).reshape(-1, 4)
    return np.concatenate(hue, axis=None).astype(np.uint8), sat.reshape(-1).astype(np.uint8), factors


HUE_TABLE, SATURATION_TABLE, HSV_FACTORS = _hsv_tables()


def _per_view(param, ndim: int = 3):
    """Returns a (...) per-view parameter broadcastable against (..., 3, S, S) planes."""
    return jnp.asarray(param)[(...,) + (None,) * ndim]


def _split(x):
    """Returns float32 (high, low) with high + low = x exactly, each of at most 12 significant
    bits: their products with 8-bit integers are exact."""
    x = jnp.asarray(x, jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000)
    high = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return high, x - high


def _product(factor, d):
    """Returns float32 factor * d rounded once, d integers of at most 9 bits: the sum of two exact
    products, so that no fused multiply-add can change it."""
    high, low = _split(factor)
    return high * d + low * d


def _divide(a, b):
    """Returns float32 a / b correctly rounded, for finite a and b != 0 (XLA's division may be an
    ulp off): the float nearest a / b among XLA's quotient and its neighbours, by the residual
    a - b q, exact from split products."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    rough = a / b
    up, down = jnp.full_like(rough, jnp.inf), jnp.full_like(rough, -jnp.inf)
    above = jnp.nextafter(rough, up)
    below = jnp.nextafter(rough, down)
    candidates = jnp.stack([jnp.nextafter(below, down), below, rough, above, jnp.nextafter(above, up)])
    b_high, b_low = _split(b)
    q_high, q_low = _split(candidates)
    residual = (((a - b_high * q_high) - b_high * q_low) - b_low * q_high) - b_low * q_low
    best = jnp.argmin(jnp.abs(residual), axis=0)
    return jnp.take_along_axis(candidates, best[None], axis=0)[0]


def _round_complement(v, high, low=0.0):
    """Returns round(v (1 - x)) half away from zero, exactly, for v integer floats in [0, 255] and
    x = high + low in [0, 1] (low below high's last bit): v - floor(v x_a) - [frac + rest > 1/2]."""
    x_a, x_b = _split(high)
    whole = v * x_a  # exact
    rest = v * x_b + v * low  # v * x_b exact; v * low far below the distance to a tie
    floor = jnp.floor(whole)
    frac = whole - floor
    # frac + rest > 1/2, exactly: 1/2 - frac is exact for frac >= 1/4; below, rest < 1/16 decides.
    return v - floor - (rest > 0.5 - frac).astype(jnp.float32)


def luma(x):
    """Returns PIL's 8-bit luma (int32, (..., S, S)) of int32 planes (..., 3, S, S)."""
    wr, wg, wb = LUMA_FIXED
    return (x[..., 0, :, :] * wr + x[..., 1, :, :] * wg + x[..., 2, :, :] * wb + 0x8000) >> 16


def mean_luma(x):
    """Returns the mean 8-bit luma of each view rounded to an integer as PIL's Contrast rounds it
    (int(mean + 0.5)), int32 (..., 1, 1, 1)."""
    total = jnp.sum(luma(x), axis=(-2, -1))
    count = x.shape[-1] * x.shape[-2]
    return _per_view((2 * total + count) // (2 * count))


def _blend(x, anchor, factor):
    """Returns PIL's blend anchor + factor (x - anchor) of 8-bit planes: float32, truncated, clipped."""
    out = anchor.astype(jnp.float32) + _product(_per_view(factor), (x - anchor).astype(jnp.float32))
    return jnp.clip(jnp.floor(out), 0, 255).astype(jnp.int32)


def adjust_brightness(x, factor):
    """Returns ImageEnhance.Brightness(x).enhance(factor) of int32 planes (..., 3, S, S)."""
    return _blend(x, jnp.zeros((), jnp.int32), factor)


def adjust_contrast(x, factor):
    """Returns ImageEnhance.Contrast(x).enhance(factor): the blend with the rounded mean luma."""
    return _blend(x, mean_luma(x), factor)


def adjust_saturation(x, factor):
    """Returns ImageEnhance.Color(x).enhance(factor): the blend with each pixel's luma."""
    return _blend(x, luma(x)[..., None, :, :], factor)


def hue_shift(delta):
    """Returns int(255 delta) (truncated, int32) of float32 delta, exactly as in double precision."""
    high, low = _split(jnp.abs(jnp.asarray(delta, jnp.float32)))
    whole, rest = high * 255.0, low * 255.0  # exact; |delta| 255 = whole + rest
    floor = jnp.floor(whole)
    frac = whole - floor
    shift = floor + (rest >= 1.0 - frac).astype(jnp.float32) - (rest < -frac).astype(jnp.float32)
    return (jnp.sign(delta) * shift).astype(jnp.int32)


def adjust_hue(x, delta):
    """Returns torchvision's adjust_hue on a PIL image: PIL's 8-bit HSV, the hue shifted by
    int(255 delta) levels modulo 256 (per view), and back to RGB as PIL converts it."""
    r, g, b = x[..., 0, :, :], x[..., 1, :, :], x[..., 2, :, :]
    top = jnp.maximum(jnp.maximum(r, g), b)
    spread = top - jnp.minimum(jnp.minimum(r, g), b)
    index = jnp.where(
        r == top,
        (top - g) * 256 + (top - b),
        jnp.where(g == top, 65536 + (top - r) * 256 + (top - b), 131072 + (top - g) * 256 + (top - r)),
    )
    hue = jnp.take(jnp.asarray(HUE_TABLE), index, mode="clip").astype(jnp.int32)
    sat = jnp.take(jnp.asarray(SATURATION_TABLE), spread * 256 + top, mode="clip").astype(jnp.int32)
    hue = (hue + _per_view(hue_shift(delta), 2)) & 255
    pair = sat * 256 + hue
    factors = [jnp.take(jnp.asarray(np.ascontiguousarray(HSV_FACTORS[:, k])), pair, mode="clip") for k in range(4)]
    v = top.astype(jnp.float32)
    p = _round_complement(v, factors[0])
    q = _round_complement(v, factors[1])
    t = _round_complement(v, factors[2], factors[3])
    sector = ((6 * hue) // 255) % 6

    def pick(*options):
        return jnp.select([sector == k for k in range(5)], options[:5], options[5])

    out = jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], axis=-3)
    return jnp.where((sat == 0)[..., None, :, :], top[..., None, :, :], out.astype(jnp.int32))


def to_grayscale(x):
    """Returns the 8-bit luma of int32 planes (..., 3, S, S), three times."""
    return jnp.broadcast_to(luma(x)[..., None, :, :], x.shape)


def _box_radius_numpy(sigma: float) -> float:
    """Returns Pillow's box radius of its three-pass Gaussian blur (float32 arithmetic, as its C)."""
    f32 = np.float32
    sigma2 = f32(f32(sigma) * f32(sigma)) / f32(BLUR_PASSES)
    length = f32(np.sqrt(12.0 * np.float64(sigma2) + 1.0))
    whole = f32(np.floor((np.float64(length) - 1.0) / 2.0))
    num = (f32(2) * whole + f32(1)) * (whole * (whole + f32(1)) - f32(3) * sigma2)
    return float(whole + num / (f32(6) * (sigma2 - (whole + f32(1)) * (whole + f32(1)))))


MAX_BOX_RADIUS = int(_box_radius_numpy(BLUR_SIGMA[1]))  # 1: sigma <= 2 needs 2 (MAX + 1) + 1 = 5 taps


def box_weights(sigma):
    """Returns Pillow's three-pass box blur of each sigma (...): (radius int32, inner weight ww,
    edge weight fw) with ww (2 radius + 1) + 2 fw = 2^24 - (0 or 1), uint32."""
    s = jnp.asarray(sigma, jnp.float32)
    sigma2 = _divide(s * s, float(BLUR_PASSES))  # correctly rounded, as every division here
    # length = float32(sqrt(12 sigma2 + 1)), the sum and the root in double in Pillow: the exact sum
    # as 1 + 12 high (exact) + 12 low, then one Newton step on the exact residual of the root.
    high, low = _split(sigma2)
    head, tail = 1.0 + 12.0 * high, 12.0 * low
    root = jnp.sqrt(head + tail)
    a, b = _split(root)
    residual = (((head - a * a) - 2.0 * a * b) - b * b) + tail
    length = root + residual / (2.0 * root)
    whole = jnp.floor((length - 1.0) / 2.0)
    num = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - _product(sigma2, 3.0))
    radius = whole + _divide(num, 6.0 * (sigma2 - (whole + 1.0) * (whole + 1.0)))
    r = radius.astype(jnp.int32)
    ww = _divide(float(1 << 24), radius * 2.0 + 1.0).astype(jnp.uint32)
    fw = (jnp.uint32(1 << 24) - (2 * r + 1).astype(jnp.uint32) * ww) // 2
    return r, ww, fw


def _box_pass(x, taps, axis: int):
    """Returns one box-blur pass of uint32 planes along `axis` (-1 or -2): the per-view tap
    weights (..., 2 MAX + 3) over replicated edges, rounded from 24-bit fixed point."""
    size, reach = x.shape[axis], MAX_BOX_RADIUS + 1
    pad = [(0, 0)] * x.ndim
    pad[axis] = (reach, reach)
    padded = jnp.pad(x, pad, mode="edge")
    total = jnp.uint32(1 << 23)
    for k in range(2 * reach + 1):
        shifted = jax.lax.slice_in_dim(padded, k, k + size, axis=axis % x.ndim)
        total = total + _per_view(taps[..., k]) * shifted
    return total >> 24


def gaussian_blur(x, sigma):
    """Returns ImageFilter.GaussianBlur(sigma) (per view) of int32 planes (..., 3, S, S), 0 < sigma <= 2."""
    r, ww, fw = box_weights(sigma)
    offsets = jnp.abs(jnp.arange(-MAX_BOX_RADIUS - 1, MAX_BOX_RADIUS + 2))
    taps = jnp.where(offsets <= r[..., None], ww[..., None], jnp.where(offsets == r[..., None] + 1, fw[..., None], 0))
    out = x.astype(jnp.uint32)
    # The passes run in loops: each reads its input at 2 MAX + 3 shifts, and XLA would otherwise
    # fuse the passes before it into every shift and compute them again (5^6 times over).
    for axis in (-1, -2):  # rows first, as Pillow
        out = jax.lax.fori_loop(0, BLUR_PASSES, lambda _, y, axis=axis: _box_pass(y, taps, axis), out)
    return out.astype(jnp.int32)


def solarize(x):
    """Returns ImageOps.solarize(x): 8-bit values >= 128 inverted."""
    return jnp.where(x >= SOLARIZE_LEVEL, 255 - x, x)


def _blend_slot(x, op, draws):
    """Returns the planes after the blend op `op` (per view: brightness, contrast, saturation,
    or NO_OP). The three are one blend with another anchor and factor: one pass, not three."""
    anchor = jnp.where(
        _per_view(op == CONTRAST_OP),
        mean_luma(x),
        jnp.where(_per_view(op == SATURATION_OP), luma(x)[..., None, :, :], 0),
    )
    factor = jnp.select(
        [op == BRIGHTNESS_OP, op == CONTRAST_OP, op == SATURATION_OP],
        [jnp.asarray(draws[k], jnp.float32) for k in ("brightness", "contrast", "saturation")],
        1.0,
    )
    return _blend(x, anchor, factor)  # NO_OP: a + 1 (x - a) = x exactly


def colour_jitter(x, draws):
    """Returns the planes after brightness, contrast, saturation and hue in the drawn order."""
    order = jnp.asarray(draws["order"])
    slots = jnp.arange(4)
    # Hue, the costly op, once: the blends drawn before it, hue, then the blends after it.
    hue_slot = jnp.min(jnp.where(order == HUE_OP, slots, 4), axis=-1)

    def blends(after: bool):
        def body(slot, y):  # a loop: each blend reads its input three times, unfused it is computed once
            op = jnp.take(order, slot, axis=-1)
            return _blend_slot(y, jnp.where((slot > hue_slot) if after else (slot < hue_slot), op, NO_OP), draws)

        return body

    x = jax.lax.fori_loop(0, 4, blends(after=False), x)
    x = jnp.where(_per_view(hue_slot < 4), adjust_hue(x, draws["hue"]), x)
    return jax.lax.fori_loop(0, 4, blends(after=True), x)


def augment_planes(x, draws):
    """Returns int32 planes (..., 3, S, S) in [0, 255] after jitter, grayscale, blur and solarize."""
    x = colour_jitter(x, draws)
    x = jnp.where(_per_view(draws["grayscale"]), to_grayscale(x), x)
    x = jnp.where(_per_view(draws["blur"]), gaussian_blur(x, draws["sigma"]), x)
    return jnp.where(_per_view(draws["solarize"]), solarize(x), x)


def to_planes(views):
    """Returns uint8 views (..., S, S, 3) as int32 planes (..., 3, S, S)."""
    return jnp.moveaxis(jnp.asarray(views), -1, -3).astype(jnp.int32)


def from_planes(x):
    """Returns int32 planes (..., 3, S, S) as uint8 views (..., S, S, 3)."""
    return jnp.moveaxis(x, -3, -1).astype(jnp.uint8)


def colour_views(views, draws):
    """Returns uint8 views (..., S, S, 3) after the colour chain of `draws`, as PIL computes it."""
    return from_planes(augment_planes(to_planes(views), draws))


def normalise(x, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=jnp.float32):
    """Returns (x / 255 - mean) / std of int32 planes (..., 3, S, S), as (..., S, S, 3) in `dtype`."""
    x = x.astype(jnp.float32) / 255.0
    return jnp.stack([(x[..., c, :, :] - m) / s for c, (m, s) in enumerate(zip(mean, std))], axis=-1).astype(dtype)


def augment_views(views, draws=None, *, dtype=jnp.float32, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Returns uint8 views (..., S, S, 3) colour-augmented by `draws` and normalised, in `dtype`.

    `draws` is the dict of one crop group from the pipeline (arrays of leading shape (...),
    "order" (..., 4)); None leaves out the colour ops (normalisation only). Flips are already
    applied by the host. Works on any leading shape, e.g. (B, count); jit it with the step.
    """
    x = to_planes(views)
    if draws is None:
        return normalise(x, mean, std, dtype)
    out = normalise(augment_planes(x, draws), mean, std, dtype)
    # The chain is integer-valued and would turn a non-finite draw into some level: a view with one
    # becomes NaN instead, for the step's finiteness check to see.
    finite = jnp.all(jnp.stack([jnp.isfinite(jnp.asarray(draws[k], jnp.float32)) for k in _FACTORS]), axis=0)
    return jnp.where(finite[..., None, None, None], out, jnp.nan)
