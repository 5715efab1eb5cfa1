"""How far the device colour chain is from the release's PIL chain, per op family, in grey levels.

    python benchmarks/colour_fidelity.py                 # 240 views per family at 224 and at 96
    python benchmarks/colour_fidelity.py --views 480 --exhaustive-hue

The same uint8 views (crops of photos resized bicubic, their mirrors, noise) and the same draws
go through `colour.colour_views` (JAX, compiled) and through `reference_pil.pil_colour` (the
release's torchvision ops on PIL images: ImageEnhance, PIL's HSV, convert("L"),
GaussianBlur(sigma), solarize). Per family (only that family's ops on; "jitter" in every
drawn order; "chain" with the release's probabilities) and size it prints a markdown table of
the differences of all pixels: mean absolute, signed mean, 99.9th percentile, maximum, and the
share of views equal byte for byte. --exhaustive-hue also converts all 2^24 colours through
PIL's HSV with several hue shifts and counts the differing pixels.
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import numpy as np
import skimage.data
from common import print_table
from PIL import Image

from references import pil as reference_pil
from vicregl_jax.data import colour

FAMILIES = (
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "jitter",
    "grayscale",
    "blur, sigma < 0.5",
    "blur, sigma >= 0.5",
    "solarize",
    "chain",
)


def make_views(rng, count: int, size: int) -> np.ndarray:
    """Returns uint8 views (count, S, S, 3): random crops of three photos resized bicubic (every
    other one mirrored) and, one in four, uniform noise."""
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    out = []
    for i in range(count):
        if i % 4 == 3:
            out.append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            continue
        photo = photos[i % 3]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w)))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        view = np.asarray(crop.resize((size, size), Image.BICUBIC))
        out.append(view[:, ::-1] if i % 2 else view)
    return np.stack(out)


def make_draws(rng, family: str, count: int) -> dict:
    """Returns the draws of `count` views with only `family`'s ops on (the release's ranges)."""
    off = np.zeros(count, bool)
    draws = {
        "order": np.full((count, 4), colour.NO_OP, np.int32),
        "grayscale": off,
        "blur": off,
        "solarize": off,
        "brightness": rng.uniform(1 - colour.BRIGHTNESS, 1 + colour.BRIGHTNESS, count).astype(np.float32),
        "contrast": rng.uniform(1 - colour.CONTRAST, 1 + colour.CONTRAST, count).astype(np.float32),
        "saturation": rng.uniform(1 - colour.SATURATION, 1 + colour.SATURATION, count).astype(np.float32),
        "hue": rng.uniform(-colour.HUE, colour.HUE, count).astype(np.float32),
        "sigma": rng.uniform(*colour.BLUR_SIGMA, count).astype(np.float32),
    }
    ops = ("brightness", "contrast", "saturation", "hue")
    if family in ops:
        draws["order"][:, 0] = ops.index(family)
    elif family == "jitter":
        draws["order"][:] = np.array(list(itertools.permutations(range(4))))[np.arange(count) % 24]
    elif family == "grayscale":
        draws["grayscale"] = ~off
    elif family.startswith("blur"):
        draws["blur"] = ~off
        small = family.endswith("< 0.5")
        draws["sigma"] = rng.uniform(*((0.1, 0.5) if small else (0.5, 2.0)), count).astype(np.float32)
    elif family == "solarize":
        draws["solarize"] = ~off
    else:  # the whole chain with the release's probabilities (blur and solarize: an even and an odd view)
        odd = np.arange(count) % 2 == 1
        jitter = rng.random(count) < colour.JITTER_PROBABILITY
        draws["order"] = np.where(jitter[:, None], np.argsort(rng.random((count, 4)), 1), colour.NO_OP).astype(np.int32)
        draws["grayscale"] = rng.random(count) < colour.GRAYSCALE_PROBABILITY
        draws["blur"] = rng.random(count) < np.where(odd, *colour.BLUR_PROBABILITY[::-1])
        draws["solarize"] = rng.random(count) < np.where(odd, *colour.SOLARIZE_PROBABILITY[::-1])
    return draws


def compare(rng, family: str, size: int, count: int, chain) -> dict:
    """Returns the table row of one family at one size."""
    views, draws = make_views(rng, count, size), make_draws(rng, family, count)
    got = np.asarray(chain(views, draws)).astype(np.int32)
    want = np.stack([reference_pil.pil_colour(views[i], {k: v[i] for k, v in draws.items()}) for i in range(count)])
    diff = got - want
    equal = np.all(diff.reshape(count, -1) == 0, axis=1).mean()
    return {
        "ops": family,
        "size": size,
        "views": count,
        "mean abs diff": f"{np.abs(diff).mean():.4f}",
        "signed mean": f"{diff.mean():+.4f}",
        "99.9th pct": f"{np.percentile(np.abs(diff), 99.9):.1f}",
        "max": int(np.abs(diff).max()),
        "views equal": f"{100 * equal:.1f}%",
    }


def exhaustive_hue(deltas) -> list[dict]:
    """Returns rows: pixels of all 2^24 colours whose hue shift differs from PIL's, per delta."""
    codes = np.arange(1 << 24, dtype=np.uint32)
    image = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)
    planes, pil, hue = colour.to_planes(image), Image.fromarray(image), jax.jit(colour.adjust_hue)
    rows = []
    for delta in np.asarray(deltas, np.float32):
        got = np.asarray(colour.from_planes(hue(planes, delta)))
        want = np.asarray(reference_pil.pil_hue(pil, float(delta)))
        rows.append(
            {
                "hue delta": f"{delta:+.4f}",
                "colours": 1 << 24,
                "differing pixels": int(np.any(got != want, axis=-1).sum()),
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, default=240, help="views per family and size")
    parser.add_argument("--sizes", default="224,96")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exhaustive-hue", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    chain = jax.jit(colour.colour_views)
    start = time.time()
    rows = [compare(rng, family, int(size), args.views, chain) for size in args.sizes.split(",") for family in FAMILIES]
    print_table(rows)
    print(f"\n({time.time() - start:.0f} s; PIL {Image.__version__}, jax {jax.__version__})")
    if args.exhaustive_hue:
        print()
        print_table(exhaustive_hue([0.1, -0.1, 0.0275, -0.0507, 0.0999]))


if __name__ == "__main__":
    main()
