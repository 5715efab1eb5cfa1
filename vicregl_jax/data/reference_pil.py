"""A plain single-image PIL implementation of the multi-crop recipe, the way the release runs it.

One image at a time, in Python: PIL random resized crop (bicubic), flip, colour jitter with
ImageEnhance in random order (hue through PIL's HSV), grayscale, PIL GaussianBlur, solarize,
then to float and normalise with numpy. It is the yardstick of benchmarks/pipeline_bench.py
and the reference of the numerics tests; the tf.data pipeline is what training uses.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from vicregl_jax.data import augment
from vicregl_jax.data.crops import CROP_RATIO, CROP_TRIES, CropGroup, grid_size, location_grid


def pil_crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio=CROP_RATIO):
    """Returns a random resized crop box (top, left, h, w), one try at a time as torchvision."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pil_brightness(img: Image.Image, factor: float) -> Image.Image:
    """Returns ImageEnhance.Brightness(img).enhance(factor)."""
    return ImageEnhance.Brightness(img).enhance(factor)


def pil_contrast(img: Image.Image, factor: float) -> Image.Image:
    """Returns ImageEnhance.Contrast(img).enhance(factor)."""
    return ImageEnhance.Contrast(img).enhance(factor)


def pil_saturation(img: Image.Image, factor: float) -> Image.Image:
    """Returns ImageEnhance.Color(img).enhance(factor)."""
    return ImageEnhance.Color(img).enhance(factor)


def pil_hue(img: Image.Image, delta: float) -> Image.Image:
    """Returns img with its 8-bit HSV hue shifted by round(delta * 255) (mod 256)."""
    h, s, v = img.convert("HSV").split()
    shifted = (np.asarray(h, np.int32) + int(round(delta * 255))) % 256
    h = Image.fromarray(shifted.astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def pil_grayscale(img: Image.Image) -> Image.Image:
    """Returns the luma of img (PIL convert "L") on three channels."""
    return img.convert("L").convert("RGB")


def pil_blur(img: Image.Image, sigma: float) -> Image.Image:
    """Returns img filtered by PIL's GaussianBlur of radius (standard deviation) sigma."""
    return img.filter(ImageFilter.GaussianBlur(sigma))


def pil_solarize(img: Image.Image) -> Image.Image:
    """Returns ImageOps.solarize(img, threshold=128)."""
    return ImageOps.solarize(img, 128)


_JITTER = (pil_brightness, pil_contrast, pil_saturation, pil_hue)


def to_normalised_array(img: Image.Image, mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD):
    """Returns the float32 (H, W, 3) normalised array of a PIL image (ToTensor + Normalize)."""
    x = np.asarray(img, np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pil_colour_augment(img: Image.Image, rng: np.random.Generator, odd: bool) -> Image.Image:
    """Returns img after jitter (p 0.8, random order), grayscale, blur and solarize."""
    if rng.random() < augment.JITTER_PROBABILITY:
        factors = (
            rng.uniform(1 - augment.BRIGHTNESS, 1 + augment.BRIGHTNESS),
            rng.uniform(1 - augment.CONTRAST, 1 + augment.CONTRAST),
            rng.uniform(1 - augment.SATURATION, 1 + augment.SATURATION),
            rng.uniform(-augment.HUE, augment.HUE),
        )
        for op in rng.permutation(4):
            img = _JITTER[op](img, factors[op])
    if rng.random() < augment.GRAYSCALE_PROBABILITY:
        img = pil_grayscale(img)
    if rng.random() < augment.BLUR_PROBABILITY[odd]:
        img = pil_blur(img, rng.uniform(*augment.BLUR_SIGMA))
    if rng.random() < augment.SOLARIZE_PROBABILITY[odd]:
        img = pil_solarize(img)
    return img


def pil_multi_crop(
    encoded: bytes,
    groups: Sequence[CropGroup],
    rng: np.random.Generator,
    stride: int = 32,
    flip_grid: bool = False,
):
    """Returns (views, grids): per group, float32 (count, S, S, 3) and (count, n, n, 2)."""
    image = Image.open(io.BytesIO(encoded)).convert("RGB")
    width, height = image.size
    views, grids = [], []
    for group in groups:
        n = grid_size(group, stride)
        group_views, group_grids = [], []
        for v in range(group.count):
            top, left, h, w = pil_crop_box(rng, height, width, group.scale)
            view = image.crop((left, top, left + w, top + h)).resize(
                (group.size, group.size), Image.BICUBIC
            )
            flipped = rng.random() < 0.5
            if flipped:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            view = pil_colour_augment(view, rng, odd=v % 2 == 1)
            group_views.append(to_normalised_array(view))
            group_grids.append(location_grid(top, left, h, w, n, flipped and flip_grid))
        views.append(np.stack(group_views))
        grids.append(np.stack(group_grids))
    return views, grids

