"""A small segmentation dataset built offline in Pascal VOC's layout, for the tests.

Coloured shapes (class 1: magenta discs, 2: blue squares, 3: green triangles) pasted on crops
of scikit-image's photos; masks are palette PNGs (SegmentationClass, VOC's palette) or
grey-level PNGs (SegmentationClassAug, as mmsegmentation's converter writes them), with a 255
band along every shape's border as VOC draws it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw
from skimage import data as skdata

# The photos the backgrounds are cut from (all RGB, 300+ pixels each side).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
SHAPE_COLOURS = {1: (230, 30, 210), 2: (30, 60, 230), 3: (40, 210, 60)}


def voc_palette() -> list[int]:
    """Returns Pascal VOC's 256-colour palette (bit-interleaved class index) as a flat list."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_palette_png(mask: np.ndarray, path: str) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path)


def synthetic_pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 RGB image, uint8 mask) with 1-3 shapes on a photo crop."""
    photo = getattr(skdata, PHOTOS[rng.integers(len(PHOTOS))])()
    top = rng.integers(0, photo.shape[0] - height + 1)
    left = rng.integers(0, photo.shape[1] - width + 1)
    image = Image.fromarray(np.ascontiguousarray(photo[top : top + height, left : left + width, :3]))
    mask = Image.new("L", (width, height), 0)
    border = Image.new("L", (width, height), 0)
    draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    border_draw = ImageDraw.Draw(border)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, 4))
        size = int(rng.integers(min(height, width) // 4, min(height, width) // 2))
        y, x = int(rng.integers(0, height - size)), int(rng.integers(0, width - size))
        box = [x, y, x + size, y + size]
        colour = tuple(int(c) for c in np.clip(np.array(SHAPE_COLOURS[cls]) + rng.integers(-30, 30, 3), 0, 255))
        points = [(x + size // 2, y), (x, y + size), (x + size, y + size)]
        for target, kwargs in (
            (draw, {"fill": colour}),
            (mask_draw, {"fill": cls}),
            (border_draw, {"outline": 1, "width": 2}),
        ):
            if cls == 1:
                target.ellipse(box, **kwargs)
            elif cls == 2:
                target.rectangle(box, **kwargs)
            else:
                target.polygon(points, **kwargs)
    out = np.asarray(mask).copy()
    out[np.asarray(border) > 0] = 255
    return np.asarray(image), out


def write_voc(root: str, *, train: int, aug: int, val: int, seed: int = 0, sizes=((96, 128), (128, 96))) -> str:
    """Writes a VOC-layout dataset under root/VOC2012; returns root (the VOCdevkit folder).

    train + aug images form split "trainaug" (aug's masks in SegmentationClassAug, grey);
    val images alternate between the given (height, width) sizes.
    """
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "VOC2012")
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    lists = {"train": [], "aug": [], "val": []}
    for split, count in (("train", train), ("aug", aug), ("val", val)):
        for i in range(count):
            name = f"2099_{split}{i:04d}"
            height, width = sizes[i % len(sizes)]
            image, mask = synthetic_pair(rng, height, width)
            Image.fromarray(image).save(os.path.join(base, "JPEGImages", name + ".jpg"), quality=95)
            if split == "aug":
                Image.fromarray(mask, mode="L").save(os.path.join(base, "SegmentationClassAug", name + ".png"))
            else:
                save_palette_png(mask, os.path.join(base, "SegmentationClass", name + ".png"))
            lists[split].append(name)
    for split, names in lists.items():
        with open(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("".join(n + "\n" for n in names))
    return root
