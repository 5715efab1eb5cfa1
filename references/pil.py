"""The release's multi-crop transform chain, one image at a time, as its DataLoader workers run it.

`ReleaseMultiCrop` reproduces the behaviour of the authors' training transforms on PIL images
(read from their release, written anew here): every image decoded by PIL and converted to
RGB; for each view a random resized crop (torchvision's algorithm, drawn from torch's global
generator) resized bicubic, all views cropped first; then per view a flip (p 0.5), colour
jitter with p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 in a random order, as
torchvision's ColorJitter on PIL images: ImageEnhance, and hue through PIL's 8-bit HSV with
the shift truncated to an integer and wrapped), grayscale p 0.2, PIL's GaussianBlur with
sigma = 0.1 + 1.9 U (numpy's global generator; p 1.0 / 0.1 for even / odd views of a group),
PIL's solarize (threshold 128; p 0.0 / 0.2), ToTensor and Normalize in torch; and each view's
location grid, built cell by cell by accumulating the cell size in float32 as the release
does, with the columns swapped for flipped views only when the grid is flipped.

It is the yardstick of benchmarks/pipeline_bench.py, and its single ops (`pil_*`) the PIL
references of the numerics tests. torch is imported only by `ReleaseMultiCrop`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from vicregl_jax.data import colour
from vicregl_jax.data.crops import CROP_RATIO, CROP_TRIES, CropGroup, grid_size


def crop_box(
    uniform: Callable[[float, float], float],
    randint: Callable[[int], int],
    height: int,
    width: int,
    scale,
    ratio=CROP_RATIO,
) -> tuple[int, int, int, int]:
    """Returns a random resized crop box (top, left, h, w), one try at a time as torchvision:
    `uniform(lo, hi)` draws a float, `randint(n)` an integer in [0, n)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_TRIES):
        target = area * uniform(scale[0], scale[1])
        aspect = math.exp(uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return randint(height - h + 1), randint(width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pil_crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio=CROP_RATIO):
    """Returns `crop_box` drawn from a numpy generator."""
    return crop_box(rng.uniform, lambda n: int(rng.integers(0, n)), height, width, scale, ratio)


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
    """Returns img with its 8-bit HSV hue shifted by delta * 255 truncated to an integer, mod 256."""
    h, s, v = img.convert("HSV").split()
    shifted = (np.asarray(h, np.int32) + int(delta * 255)) % 256
    h = Image.fromarray(shifted.astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def pil_grayscale(img: Image.Image) -> Image.Image:
    """Returns the luma of img (PIL convert "L") on three channels."""
    grey = np.asarray(img.convert("L"))
    return Image.fromarray(np.dstack([grey, grey, grey]), "RGB")


def pil_blur(img: Image.Image, sigma: float) -> Image.Image:
    """Returns img filtered by PIL's GaussianBlur of radius (standard deviation) sigma."""
    return img.filter(ImageFilter.GaussianBlur(sigma))


def pil_solarize(img: Image.Image) -> Image.Image:
    """Returns ImageOps.solarize(img) (threshold 128)."""
    return ImageOps.solarize(img)


_JITTER = (pil_brightness, pil_contrast, pil_saturation, pil_hue)


def pil_colour(view: np.ndarray, draws: dict) -> np.ndarray:
    """Returns a uint8 view (S, S, 3) after the colour chain of its draws (one view's entries of
    the pipeline's draws) as the release computes it with torchvision's ops on a PIL image:
    jitter in the drawn order, grayscale, GaussianBlur(sigma), solarize."""
    img = Image.fromarray(np.ascontiguousarray(view, np.uint8), "RGB")
    factors = [float(draws[k]) for k in ("brightness", "contrast", "saturation", "hue")]
    for op in np.asarray(draws["order"]).tolist():
        if op != colour.NO_OP:
            img = _JITTER[op](img, factors[op])
    if draws["grayscale"]:
        img = pil_grayscale(img)
    if draws["blur"]:
        img = pil_blur(img, float(draws["sigma"]))
    if draws["solarize"]:
        img = pil_solarize(img)
    return np.asarray(img)


class ReleaseMultiCrop:
    """The release's training transform: `__call__(encoded bytes)` returns (views, grids),
    lists over all views (groups in order) of float32 torch tensors (3, S, S) and (n, n, 2)."""

    def __init__(self, groups: Sequence[CropGroup], stride: int = 32, flip_grid: bool = False):
        import torch

        self._torch = torch
        self.groups = tuple(groups)
        self.grid_sizes = [grid_size(g, stride) for g in self.groups]
        self.flip_grid = flip_grid
        self._mean = torch.tensor(colour.IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(colour.IMAGENET_STD).view(3, 1, 1)

    def _uniform(self, lo: float, hi: float) -> float:
        return self._torch.empty(1).uniform_(lo, hi).item()

    def _randint(self, n: int) -> int:
        return int(self._torch.randint(0, n, size=(1,)).item())

    def _chance(self, p: float) -> bool:
        """Flip and RandomGrayscale: True when rand < p."""
        return bool(self._torch.rand(1) < p)

    def _applies(self, p: float) -> bool:
        """RandomApply: skipped when p < rand."""
        return not bool(p < self._torch.rand(1))

    def _colour(self, img: Image.Image, odd: bool) -> Image.Image:
        torch = self._torch
        if self._applies(colour.JITTER_PROBABILITY):
            order = torch.randperm(4)
            factors = (
                self._uniform(1 - colour.BRIGHTNESS, 1 + colour.BRIGHTNESS),
                self._uniform(1 - colour.CONTRAST, 1 + colour.CONTRAST),
                self._uniform(1 - colour.SATURATION, 1 + colour.SATURATION),
                self._uniform(-colour.HUE, colour.HUE),
            )
            for op in order.tolist():
                img = _JITTER[op](img, factors[op])
        if self._chance(colour.GRAYSCALE_PROBABILITY):
            img = pil_grayscale(img)
        if self._applies(colour.BLUR_PROBABILITY[odd]):
            img = pil_blur(img, np.random.rand() * 1.9 + 0.1)
        if self._applies(colour.SOLARIZE_PROBABILITY[odd]):
            img = pil_solarize(img)
        return img

    def _to_tensor(self, img: Image.Image):
        torch = self._torch
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return x.float().div(255).sub_(self._mean).div_(self._std)

    def _grid(self, top: int, left: int, height: int, width: int, n: int, flip: bool):
        """The release's grid: cell centres accumulated cell by cell in float32."""
        torch = self._torch
        rows, cols = torch.zeros(n, n), torch.zeros(n, n)
        cell_h, cell_w = height / n, width / n
        rows[0][0], cols[0][0] = top + cell_h / 2, left + cell_w / 2
        for k in range(1, n):
            rows[k][0], cols[k][0] = rows[k - 1][0] + cell_h, cols[k - 1][0]
        for col in range(1, n):
            rows[0][col], cols[0][col] = rows[0][col - 1], cols[0][col - 1] + cell_w
        for k in range(1, n):
            for col in range(1, n):
                rows[k][col] = rows[k - 1][col] + cell_h
                cols[k][col] = cols[k][col - 1] + cell_w
        grid = torch.stack([rows, cols], dim=-1)
        if flip:
            for k in range(n):
                for col in range(n // 2):
                    swap = grid[k, col].clone()
                    grid[k, col] = grid[k, n - 1 - col]
                    grid[k, n - 1 - col] = swap
        return grid

    def __call__(self, encoded: bytes):
        image = Image.open(io.BytesIO(encoded)).convert("RGB")
        width, height = image.size
        resized = []  # all views are cropped first, as the release does
        for group in self.groups:
            for _ in range(group.count):
                box = crop_box(self._uniform, self._randint, height, width, group.scale)
                top, left, h, w = box
                view = image.crop((left, top, left + w, top + h)).resize((group.size, group.size), Image.BICUBIC)
                resized.append((view, box))
        views, grids, k = [], [], 0
        for group, n in zip(self.groups, self.grid_sizes):
            for v in range(group.count):
                view, (top, left, h, w) = resized[k]
                k += 1
                flipped = self._chance(0.5)
                if flipped:
                    view = view.transpose(Image.FLIP_LEFT_RIGHT)
                views.append(self._to_tensor(self._colour(view, odd=v % 2 == 1)))
                grids.append(self._grid(top, left, h, w, n, flipped and self.flip_grid))
        return views, grids
