"""Semantic segmentation data as mmsegmentation prepares it: dataset layouts, masks, the
training augmentation and the test-time resize (evaluate/segment.py trains and scores on it).

Datasets are named "LAYOUT:PATH" in the folders people download:

    voc:PATH         PATH/VOC2012 (or PATH itself) with JPEGImages/, SegmentationClass/,
                     SegmentationClassAug/ and ImageSets/Segmentation/{train,val,aug}.txt;
                     split "trainaug" = train.txt (SegmentationClass) + aug.txt
                     (SegmentationClassAug): 1,464 + 9,118 = 10,582 images; "val": 1,449.
    ade20k:PATH      PATH/ADEChallengeData2016 (or PATH itself) with images/{training,
                     validation}/*.jpg and annotations/{training,validation}/*.png;
                     150 classes, label 0 ("other") ignored and the rest shifted down by one.
    cityscapes:PATH  PATH/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and
                     PATH/gtFine/{train,val}/CITY/*_gtFine_labelTrainIds.png (19 classes).

Masks are PNGs of class indices, read with PIL: a palette PNG (VOC's SegmentationClass) gives
its palette indices, a grey-level PNG its values; 255 is ignored everywhere.

Training examples (`make_train_iterator`) follow mmsegmentation's pipeline: rescale the
(long, short) scale by a ratio drawn in [0.5, 2.0], keeping the aspect ratio (bilinear image,
nearest mask); random crop, redrawn up to 10 times while one class fills 75% or more of the
crop's labelled pixels; horizontal flip with p 0.5; photometric distortion (brightness,
contrast, saturation, hue, each with p 0.5, on uint8 with OpenCV's HSV conversion); normalise;
pad to the crop size with 0 (mask 255). Batch t is a function of (seed, t): the stream of
examples is a fresh permutation per epoch and every random draw is keyed by the example's
position in the stream, so resuming at step t is a seek and the batches do not depend on the
number of parallel calls. Test images (`make_eval_iterator`) are rescaled to the scale keeping
the aspect ratio; their masks stay at the original resolution.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import io
import os
import typing
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

IGNORE_LABEL = 255
# mmsegmentation's normalisation (0-255 RGB): ImageNet's mean and std (0.229 for red, not the
# 0.228 that pre-training uses).
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A dataset layout and mmsegmentation's settings for it.

    scale: (long, short) edge bounds of the rescale; crop_size: (height, width).
    """

    name: str
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    train_split: str
    eval_split: str
    scale: tuple[int, int]
    crop_size: tuple[int, int]
    reduce_zero_label: bool
    steps: int  # the release's schedule for this dataset
    batch_size: int  # images per step of mmsegmentation's recipe (all devices)
    example_path: str  # shown in error messages

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


LAYOUTS = {
    "voc": Layout("voc", VOC_CLASSES, ("trainaug", "train", "val"), "trainaug", "val",
                  (2048, 512), (512, 512), False, 40_000, 16, "/data/VOCdevkit"),
    "ade20k": Layout("ade20k", ADE20K_CLASSES, ("training", "validation"), "training",
                     "validation", (2048, 512), (512, 512), True, 160_000, 16,
                     "/data/ADEChallengeData2016"),
    "cityscapes": Layout("cityscapes", CITYSCAPES_CLASSES, ("train", "val"), "train", "val",
                         (2048, 1024), (512, 1024), False, 40_000, 8, "/data/cityscapes"),
}


@dataclasses.dataclass(frozen=True)
class SegmentationSplit:
    """The image and mask files of one split of a dataset, in a fixed order."""

    layout: Layout
    root: str
    split: str
    images: tuple[str, ...]
    masks: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)


def parse_dataset(spec: str) -> tuple[Layout, str]:
    """Returns (layout, path) of a dataset named "voc:PATH", "ade20k:PATH" or "cityscapes:PATH"."""
    name, sep, path = str(spec).partition(":")
    if not sep or name not in LAYOUTS or not path:
        examples = ", ".join(f"{k}:{v.example_path}" for k, v in LAYOUTS.items())
        raise ValueError(f"segmentation dataset {spec!r}: name a layout and its folder, one of "
                         f"{examples}")
    return LAYOUTS[name], path


# ------------------------------------------------------------------------------ listing

def _join(*parts: str) -> str:
    return os.path.join(*parts)


def _require_dir(path: str, what: str, layout: Layout) -> None:
    if not tf.io.gfile.isdir(path):
        raise FileNotFoundError(f"{path} does not exist: the {layout.name} layout needs {what} "
                                f"there (see the README's segmentation section)")


def _files(directory: str) -> set[str]:
    """Returns the names in directory (one listing, also fast on gs://)."""
    return set(tf.io.gfile.listdir(directory))


def _missing_error(what: str, missing: list[str], total: int, where: str) -> FileNotFoundError:
    return FileNotFoundError(f"{len(missing)} of {total} {what} are missing from {where}, e.g. "
                             f"{', '.join(missing[:3])}: the download is incomplete or in "
                             "another layout")


def _voc_root(root: str) -> str:
    for candidate in (_join(root, "VOC2012"), root):
        if tf.io.gfile.isdir(_join(candidate, "JPEGImages")):
            return candidate
    raise FileNotFoundError(
        f"{root} holds neither VOC2012/JPEGImages nor JPEGImages: pass the VOCdevkit folder of "
        "Pascal VOC 2012 (VOCtrainval_11-May-2012.tar), e.g. voc:/data/VOCdevkit")


def _read_ids(path: str, layout: Layout, hint: str) -> list[str]:
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {hint}")
    with tf.io.gfile.GFile(path) as f:
        return [line.strip() for line in f if line.strip()]


def _list_voc(root: str, split: str, layout: Layout) -> tuple[list[str], list[str]]:
    base = _voc_root(root)
    sets = _join(base, "ImageSets", "Segmentation")
    parts = {"train": [("train.txt", "SegmentationClass")],
             "val": [("val.txt", "SegmentationClass")],
             "trainaug": [("train.txt", "SegmentationClass"), ("aug.txt", "SegmentationClassAug")]}
    aug_hint = ("make SegmentationClassAug/ and ImageSets/Segmentation/aug.txt from the SBD "
                "download (benchmark.tgz) with mmsegmentation's tools/convert_datasets/voc_aug.py, "
                "or use split 'train' (1,464 images, no SBD)")
    images_dir = _join(base, "JPEGImages")
    # Every list and folder first, so that a missing download is named before any file is.
    wanted = []
    for list_name, mask_dir_name in parts[split]:
        hint = aug_hint if list_name == "aug.txt" else "it ships with VOC 2012's trainval tar"
        ids = _read_ids(_join(sets, list_name), layout, hint)
        mask_dir = _join(base, mask_dir_name)
        if not tf.io.gfile.isdir(mask_dir):
            raise FileNotFoundError(f"{mask_dir} does not exist: {hint}")
        wanted.append((list_name, ids, mask_dir))
    jpegs = _files(images_dir)
    images, masks = [], []
    for list_name, ids, mask_dir in wanted:
        pngs = _files(mask_dir)
        missing = [i + ".jpg" for i in ids if i + ".jpg" not in jpegs]
        if missing:
            raise _missing_error(f"images of {list_name}", missing, len(ids), images_dir)
        missing = [i + ".png" for i in ids if i + ".png" not in pngs]
        if missing:
            raise _missing_error(f"masks of {list_name}", missing, len(ids), mask_dir)
        images += [_join(images_dir, i + ".jpg") for i in ids]
        masks += [_join(mask_dir, i + ".png") for i in ids]
    return images, masks


def _list_ade20k(root: str, split: str, layout: Layout) -> tuple[list[str], list[str]]:
    base = _join(root, "ADEChallengeData2016")
    if not tf.io.gfile.isdir(base):
        base = root
    images_dir = _join(base, "images", split)
    masks_dir = _join(base, "annotations", split)
    _require_dir(images_dir, f"images/{split}/*.jpg (ADEChallengeData2016.zip)", layout)
    _require_dir(masks_dir, f"annotations/{split}/*.png (ADEChallengeData2016.zip)", layout)
    stems = sorted(n[:-4] for n in _files(images_dir) if n.endswith(".jpg"))
    pngs = _files(masks_dir)
    missing = [s + ".png" for s in stems if s + ".png" not in pngs]
    if missing:
        raise _missing_error("annotations", missing, len(stems), masks_dir)
    return ([_join(images_dir, s + ".jpg") for s in stems],
            [_join(masks_dir, s + ".png") for s in stems])


def _list_cityscapes(root: str, split: str, layout: Layout) -> tuple[list[str], list[str]]:
    images_root = _join(root, "leftImg8bit", split)
    masks_root = _join(root, "gtFine", split)
    _require_dir(images_root, f"leftImg8bit/{split}/CITY/*_leftImg8bit.png "
                 "(leftImg8bit_trainvaltest.zip)", layout)
    _require_dir(masks_root, f"gtFine/{split}/CITY/*_gtFine_labelTrainIds.png "
                 "(gtFine_trainvaltest.zip)", layout)
    images, masks, missing, total = [], [], [], 0
    for city in sorted(tf.io.gfile.listdir(images_root)):
        city = city.rstrip("/")
        names = sorted(n for n in _files(_join(images_root, city))
                       if n.endswith("_leftImg8bit.png"))
        city_masks = _join(masks_root, city)
        labels = _files(city_masks) if tf.io.gfile.isdir(city_masks) else set()
        for name in names:
            total += 1
            label = name[: -len("_leftImg8bit.png")] + "_gtFine_labelTrainIds.png"
            if label not in labels:
                missing.append(f"{city}/{label}")
                continue
            images.append(_join(images_root, city, name))
            masks.append(_join(masks_root, city, label))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {total} images have no gtFine/{split}/{missing[0]}: make the "
            "*_labelTrainIds.png files with cityscapesscripts' createTrainIdLabelImgs (or "
            "mmsegmentation's tools/convert_datasets/cityscapes.py)")
    return images, masks


_LISTERS = {"voc": _list_voc, "ade20k": _list_ade20k, "cityscapes": _list_cityscapes}


def open_split(spec: str, split: str | None = None, *, train: bool = True) -> SegmentationSplit:
    """Returns the files of a split of the dataset "LAYOUT:PATH".

    split: a split of the layout; None gives its training split (train=True) or its
    evaluation split. A wrong path or layout raises FileNotFoundError naming what was
    expected where.
    """
    layout, root = parse_dataset(spec)
    split = split or (layout.train_split if train else layout.eval_split)
    if split not in layout.splits:
        raise ValueError(f"split {split!r} of {layout.name}: use one of {layout.splits}")
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f"{root} does not exist: pass the folder of the {layout.name} "
                                f"download, e.g. {layout.name}:{layout.example_path}")
    images, masks = _LISTERS[layout.name](root, split, layout)
    if not images:
        raise FileNotFoundError(f"no images in split {split!r} of {spec}")
    return SegmentationSplit(layout, root, split, tuple(images), tuple(masks))


# -------------------------------------------------------------------------------- masks

def decode_mask(data: bytes, *, num_classes: int, reduce_zero_label: bool = False,
                name: str = "mask") -> np.ndarray:
    """Returns the class indices (H, W) uint8 of a PNG mask (255 = ignore).

    Palette PNGs give their palette indices and grey-level ones their values (PIL), never
    the colours. With reduce_zero_label, 0 becomes 255 and the other labels drop by one.
    Labels >= num_classes other than 255 raise ValueError (a mask of another dataset, or
    colours instead of indices).
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{name} is a {image.mode} image: masks must hold class indices "
                             "(palette or grey-level PNG), not colours")
        mask = np.asarray(image)
    if mask.ndim != 2 or mask.max(initial=0) > 255:
        raise ValueError(f"{name}: expected one channel of class indices 0-255")
    mask = mask.astype(np.uint8)
    if reduce_zero_label:
        # 0 ("other") is ignored; the uint8 wrap sends it to 255 and keeps 255 there.
        mask = np.where(mask == IGNORE_LABEL, IGNORE_LABEL, mask - np.uint8(1)).astype(np.uint8)
    bad = (mask >= num_classes) & (mask != IGNORE_LABEL)
    if bad.any():
        raise ValueError(f"{name} holds label {int(mask[bad][0])} but the dataset has "
                         f"{num_classes} classes (0-{num_classes - 1}, 255 ignored): is it a "
                         "colour-coded mask, or a mask of another dataset?")
    return mask


def read_mask(path: str, *, num_classes: int, reduce_zero_label: bool = False) -> np.ndarray:
    """Returns the class indices (H, W) uint8 of the PNG mask at path (see decode_mask)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        return decode_mask(f.read(), num_classes=num_classes,
                           reduce_zero_label=reduce_zero_label, name=path)


def image_size(path: str) -> tuple[int, int]:
    """Returns (height, width) of an image file, from its header."""
    with tf.io.gfile.GFile(path, "rb") as f, Image.open(f) as image:
        return image.height, image.width


def image_sizes(paths: Sequence[str], threads: int = 16) -> list[tuple[int, int]]:
    """Returns (height, width) of every image, reading headers in parallel."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(image_size, paths))


# ---------------------------------------------------------------------------- geometry

def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """Returns (height, width) after mmcv's keep-ratio rescale to scale = (long, short) bounds:
    the largest size whose long edge fits max(scale) and short edge fits min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def slide_windows(height: int, width: int, crop: Sequence[int], stride: Sequence[int]
                  ) -> list[tuple[int, int, int, int]]:
    """Returns the (top, left, height, width) windows of sliding-window inference.

    mmsegmentation's grid: windows every `stride` pixels, the last shifted back to end at the
    border; an image smaller than the crop gives one window of its own size on that axis.
    """
    def starts(size, c, s):
        count = max(size - c + s - 1, 0) // s + 1
        return [max(min(i * s + c, size) - c, 0) for i in range(count)]

    ch, cw = min(crop[0], height), min(crop[1], width)
    return [(y, x, ch, cw) for y in starts(height, crop[0], stride[0])
            for x in starts(width, crop[1], stride[1])]


def _resize_image(image, height, width):
    """Bilinear resize without antialiasing (OpenCV's INTER_LINEAR), rounded to uint8 levels."""
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                              method="bilinear", antialias=False)
    return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


def _nearest_indices(size_in, size_out):
    """OpenCV's INTER_NEAREST source index of every output pixel: floor(i * in / out)."""
    ratio = 1.0 / (tf.cast(size_out, tf.float64) / tf.cast(size_in, tf.float64))
    index = tf.cast(tf.floor(tf.cast(tf.range(size_out), tf.float64) * ratio), tf.int32)
    return tf.minimum(index, size_in - 1)


def _resize_mask(mask, height, width):
    shape = tf.shape(mask)
    mask = tf.gather(mask, _nearest_indices(shape[0], height), axis=0)
    return tf.gather(mask, _nearest_indices(shape[1], width), axis=1)


def _rescale_size_tf(height, width, long_edge, short_edge):
    """rescale_size in graph mode, in float64 as mmcv computes it in Python."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    factor = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
    return (tf.cast(tf.floor(h * factor + 0.5), tf.int32),
            tf.cast(tf.floor(w * factor + 0.5), tf.int32))


# ------------------------------------------------------- photometric distortion (uint8)

def _division_table(numerator: int, scale: float) -> np.ndarray:
    """OpenCV's fixed-point reciprocal tables: round(numerator * 2^12 / (scale * i)), 0 at i=0."""
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        table = np.where(i > 0, np.rint((numerator << 12) / (scale * np.maximum(i, 1))), 0)
    return table.astype(np.int64)


_SATURATION_DIVISION = _division_table(255, 1.0)
_HUE_DIVISION = _division_table(180, 6.0)


def _fixed_point_round(x):
    """(x + 2^11) >> 12: a 12-bit fixed-point value rounded (arithmetic shift, floors)."""
    return tf.bitwise.right_shift(x + 2048, tf.constant(12, tf.int64))


def rgb_to_hsv_uint8(rgb):
    """Returns OpenCV's 8-bit HSV (H in 0-179, S and V in 0-255) of uint8-valued RGB, as int32.

    The same integer arithmetic as cv2.cvtColor(COLOR_RGB2HSV) on uint8 images (12-bit
    fixed-point reciprocals, rounding half up), so that the distortion's round trips lose
    what OpenCV's lose.
    """
    rgb = tf.cast(rgb, tf.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = tf.maximum(tf.maximum(r, g), b)
    diff = v - tf.minimum(tf.minimum(r, g), b)
    s = _fixed_point_round(diff * tf.gather(_SATURATION_DIVISION, v))
    h = tf.where(v == r, g - b, tf.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = _fixed_point_round(h * tf.gather(_HUE_DIVISION, diff))
    h = tf.where(h < 0, h + 180, h)
    return tf.cast(tf.stack([h, s, v], axis=-1), tf.int32)


def hsv_uint8_to_rgb(hsv):
    """Returns uint8-valued RGB (float32) of OpenCV's 8-bit HSV, as cv2.cvtColor(COLOR_HSV2RGB)
    computes it in its vectorised path: float32 arithmetic, outputs truncated.

    (OpenCV 4.x / 5.x round instead for the last few pixels of a row that do not fill a
    vector, width mod 16 to 64 by CPU: those can differ by one grey level.)
    """
    hsv = tf.cast(hsv, tf.float32)
    h = hsv[..., 0] * np.float32(6.0 / 180.0)
    s = hsv[..., 1] * np.float32(1.0 / 255.0)
    v = hsv[..., 2] * np.float32(1.0 / 255.0)
    sector = tf.floor(h)
    f = h - sector
    sector = tf.cast(sector, tf.int32) % 6
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    # (r, g, b) per sector of the hue circle.
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    channels = []
    for c in range(3):
        out = choices[5][c]
        for k in range(4, -1, -1):
            out = tf.where(sector == k, choices[k][c], out)
        out = tf.where(s == 0.0, v, out)
        channels.append(out)
    return tf.clip_by_value(tf.floor(tf.stack(channels, axis=-1) * 255.0), 0.0, 255.0)


def _scale_clip_truncate(x, alpha=1.0, beta=0.0):
    """x * alpha + beta in float32, clipped to [0, 255] and truncated (numpy's astype(uint8))."""
    return tf.floor(tf.clip_by_value(x * alpha + beta, 0.0, 255.0))


# The uniform draws of one training example, by position in its vector.
_RATIO, _CROP_Y, _CROP_X = 0, 1, 12  # 11 crop candidates each
_FLIP, _BRIGHT, _BRIGHT_DELTA, _CONTRAST_LAST = 23, 24, 25, 26
_CONTRAST, _CONTRAST_ALPHA, _SATURATE, _SATURATE_ALPHA, _HUE, _HUE_DELTA = 27, 28, 29, 30, 31, 32
_NUM_DRAWS = 33
_CROP_TRIES = 10


def photometric_distortion(image, draws):
    """mmsegmentation's PhotoMetricDistortion on a uint8-valued float32 RGB image.

    Brightness +U(-32, 32), then contrast x U(0.5, 1.5) either second or last, saturation
    x U(0.5, 1.5) and hue + randint(-18, 18) (mod 180) in OpenCV's 8-bit HSV; each step with
    p 0.5 and rounded to uint8 as mmsegmentation does. draws: the example's uniform draws.
    """
    def contrast(x):
        return tf.cond(draws[_CONTRAST] < 0.5,
                       lambda: _scale_clip_truncate(x, alpha=0.5 + draws[_CONTRAST_ALPHA]),
                       lambda: x)

    def saturation(x):
        def apply():
            hsv = rgb_to_hsv_uint8(x)
            s = _scale_clip_truncate(tf.cast(hsv[..., 1], tf.float32),
                                     alpha=0.5 + draws[_SATURATE_ALPHA])
            return hsv_uint8_to_rgb(tf.stack([hsv[..., 0], tf.cast(s, tf.int32), hsv[..., 2]], -1))
        return tf.cond(draws[_SATURATE] < 0.5, apply, lambda: x)

    def hue(x):
        def apply():
            hsv = rgb_to_hsv_uint8(x)
            delta = tf.cast(tf.floor(draws[_HUE_DELTA] * 36.0), tf.int32) - 18  # -18..17
            return hsv_uint8_to_rgb(tf.stack([(hsv[..., 0] + delta) % 180, hsv[..., 1],
                                              hsv[..., 2]], -1))
        return tf.cond(draws[_HUE] < 0.5, apply, lambda: x)

    contrast_last = draws[_CONTRAST_LAST] < 0.5
    x = tf.cond(draws[_BRIGHT] < 0.5,
                lambda: _scale_clip_truncate(image, beta=64.0 * draws[_BRIGHT_DELTA] - 32.0),
                lambda: image)
    x = tf.cond(contrast_last, lambda: x, lambda: contrast(x))
    x = hue(saturation(x))
    return tf.cond(contrast_last, lambda: contrast(x), lambda: x)


def _crop_is_balanced(mask, top, left, crop_h, crop_w, cat_max_ratio):
    """mmsegmentation's test: 2+ labelled classes and none above cat_max_ratio of them."""
    crop = tf.reshape(tf.cast(mask[top:top + crop_h, left:left + crop_w], tf.int32), [-1])
    counts = tf.math.bincount(crop, minlength=256, maxlength=256)[:IGNORE_LABEL]
    total = tf.reduce_sum(counts)
    return tf.logical_and(
        tf.math.count_nonzero(counts) > 1,
        tf.cast(tf.reduce_max(counts), tf.float64)
        < cat_max_ratio * tf.cast(tf.maximum(total, 1), tf.float64))


def random_crop(image, mask, draws, crop_size, cat_max_ratio):
    """Returns (image, mask) cropped as mmsegmentation's RandomCrop: the first of up to 10
    drawn windows whose mask passes the class-balance test, else the 11th drawn."""
    shape = tf.shape(mask)
    crop_h, crop_w = tf.minimum(shape[0], crop_size[0]), tf.minimum(shape[1], crop_size[1])
    tops = tf.cast(tf.floor(draws[_CROP_Y:_CROP_Y + 11]
                            * tf.cast(shape[0] - crop_h + 1, tf.float32)), tf.int32)
    lefts = tf.cast(tf.floor(draws[_CROP_X:_CROP_X + 11]
                             * tf.cast(shape[1] - crop_w + 1, tf.float32)), tf.int32)
    if cat_max_ratio < 1.0:
        (choice,) = tf.while_loop(
            lambda c: tf.logical_and(c < _CROP_TRIES, tf.logical_not(_crop_is_balanced(
                mask, tops[c], lefts[c], crop_h, crop_w, cat_max_ratio))),
            lambda c: (c + 1,), (tf.constant(0),))
    else:
        choice = tf.constant(0)
    top, left = tops[choice], lefts[choice]
    return (image[top:top + crop_h, left:left + crop_w],
            mask[top:top + crop_h, left:left + crop_w])


def normalise(image):
    """Returns (image - mean) / std in mmsegmentation's RGB constants, float32."""
    return (image - np.asarray(MEAN_RGB, np.float32)) / np.asarray(STD_RGB, np.float32)


# ------------------------------------------------------------------------------ reading

class ClosingIterator:
    """A tf.data numpy iterator that is released at interpreter exit.

    The masks are decoded by Python (PIL) inside the pipeline; a live iterator whose
    prefetching threads wait for the GIL then blocks the interpreter's exit for ever (after an
    exception too). Every instance is closed by an atexit hook, or by `close()`.
    """

    _live: typing.ClassVar[weakref.WeakSet] = weakref.WeakSet()

    def __init__(self, dataset: tf.data.Dataset):
        self._iterator = dataset.as_numpy_iterator()
        ClosingIterator._live.add(self)

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            raise StopIteration
        return next(self._iterator)

    def close(self) -> None:
        """Releases the pipeline (its threads and buffers); the iterator then ends."""
        self._iterator = None


@atexit.register
def _close_live_iterators() -> None:
    for iterator in list(ClosingIterator._live):
        iterator.close()


def _decode_image(data, is_png: bool):
    # JPEGs with the accurate integer DCT: the decoder OpenCV and PIL use.
    if is_png:
        return tf.io.decode_png(data, channels=3)
    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")


def _load_pair(split: SegmentationSplit):
    """Returns load(index) -> (uint8 image (H, W, 3), uint8 mask (H, W)) for split's files."""
    images = tf.constant(split.images)
    masks = tf.constant(split.masks)
    is_png = split.images[0].lower().endswith(".png")
    num_classes, reduce_zero = split.layout.num_classes, split.layout.reduce_zero_label

    def mask_from_bytes(data, name, image_path, image_shape):
        mask = decode_mask(bytes(data), num_classes=num_classes, reduce_zero_label=reduce_zero,
                           name=name.decode())
        if mask.shape != tuple(image_shape[:2]):
            raise ValueError(f"{name.decode()} is {mask.shape[0]}x{mask.shape[1]} but its image "
                             f"{image_path.decode()} is {image_shape[0]}x{image_shape[1]}")
        return mask

    def load(index):
        image = _decode_image(tf.io.read_file(images[index]), is_png)
        mask = tf.numpy_function(
            mask_from_bytes, [tf.io.read_file(masks[index]), masks[index], images[index],
                              tf.shape(image)], tf.uint8, stateful=False)
        return image, tf.ensure_shape(mask, [None, None])

    return load


def make_train_iterator(split: SegmentationSplit, *, global_batch_size: int, seed: int,
                        start_step: int = 0, scale: Sequence[int] | None = None,
                        crop_size: Sequence[int] | None = None,
                        ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                        process_index: int = 0, process_count: int = 1
                        ) -> Iterator[dict[str, np.ndarray]]:
    """Yields this host's training batches {"image" (b, ch, cw, 3) float32 normalised,
    "mask" (b, ch, cw) uint8}, b = global_batch_size / process_count, from step start_step on.

    Host p holds rows p*b .. (p+1)*b - 1 of every global batch; batch t is a function of
    (seed, t) only. scale / crop_size default to the layout's.
    """
    if global_batch_size % process_count:
        raise ValueError(f"batch size {global_batch_size} must be divisible by the "
                         f"{process_count} hosts")
    layout = split.layout
    long_edge, short_edge = (float(max(scale or layout.scale)), float(min(scale or layout.scale)))
    crop_h, crop_w = crop_size or layout.crop_size
    local = global_batch_size // process_count
    count = len(split)
    load = _load_pair(split)
    low, high = float(ratio_range[0]), float(ratio_range[1])
    base_seed = tf.constant([seed, 0], tf.int64)

    def example(position):
        # position: index in the endless stream of examples (a permutation per epoch).
        epoch = position // count
        shuffle_seed = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(base_seed, 0), epoch)
        index = tf.random.experimental.index_shuffle(position % count, shuffle_seed,
                                                     tf.constant(count - 1, tf.int64))
        draws = tf.random.stateless_uniform(
            [_NUM_DRAWS], tf.random.experimental.stateless_fold_in(
                tf.random.experimental.stateless_fold_in(base_seed, 1), position))
        image, mask = load(index)
        ratio = tf.cast(low + (high - low) * draws[_RATIO], tf.float64)
        height, width = _rescale_size_tf(tf.shape(mask)[0], tf.shape(mask)[1],
                                         tf.floor(long_edge * ratio), tf.floor(short_edge * ratio))
        image = _resize_image(image, height, width)
        mask = _resize_mask(mask, height, width)
        image, mask = random_crop(image, mask, draws, (crop_h, crop_w), cat_max_ratio)
        flip = draws[_FLIP] < 0.5
        image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
        mask = tf.cond(flip, lambda: mask[:, ::-1], lambda: mask)
        image = normalise(photometric_distortion(image, draws))
        pad_h, pad_w = crop_h - tf.shape(mask)[0], crop_w - tf.shape(mask)[1]
        image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
        mask = tf.pad(mask, [[0, pad_h], [0, pad_w]], constant_values=IGNORE_LABEL)
        return {"image": tf.ensure_shape(image, [crop_h, crop_w, 3]),
                "mask": tf.ensure_shape(mask, [crop_h, crop_w])}

    rows = tf.data.Dataset.range(start_step * local, 2**62)
    positions = rows.map(lambda r: (r // local) * global_batch_size + process_index * local
                         + r % local)
    ds = positions.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ClosingIterator(ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


# --------------------------------------------------------------------------- evaluation

@dataclasses.dataclass(frozen=True)
class EvalChunk:
    """Images of one original size evaluated together (a multiple of the mesh size).

    indices: global example indices; rows past `count` repeat the first (valid False).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    indices: tuple[int, ...]
    count: int

    @property
    def valid(self) -> np.ndarray:
        return np.arange(len(self.indices)) < self.count


def eval_chunks(sizes: Sequence[tuple[int, int]], *, scale: Sequence[int],
                images_per_chunk: int, row_multiple: int) -> list[EvalChunk]:
    """Returns the evaluation schedule: images grouped by original size (sorted), in chunks of
    at most images_per_chunk, each padded to a multiple of row_multiple rows.

    Every host computes the same schedule from the same sizes, so that they run the same
    sequence of programs.
    """
    if images_per_chunk % row_multiple:
        raise ValueError(f"images_per_chunk={images_per_chunk} must be a multiple of "
                         f"{row_multiple} (the devices)")
    groups = collections.defaultdict(list)
    for index, size in enumerate(sizes):
        groups[tuple(size)].append(index)
    chunks = []
    for size in sorted(groups):
        indices = groups[size]
        resized = rescale_size(size[0], size[1], scale)
        for start in range(0, len(indices), images_per_chunk):
            part = indices[start:start + images_per_chunk]
            rows = -(-len(part) // row_multiple) * row_multiple
            chunks.append(EvalChunk(size, resized, tuple(part + [part[0]] * (rows - len(part))),
                                    len(part)))
    return chunks


def make_eval_iterator(split: SegmentationSplit, chunks: Sequence[EvalChunk], *,
                       process_index: int = 0, process_count: int = 1
                       ) -> Iterator[dict[str, np.ndarray]]:
    """Yields this host's rows of every chunk: {"image" (b, Hs, Ws, 3) float32 normalised at
    the chunk's resized size, "mask" (b, H, W) uint8 at the original size, "valid" (b,)}."""
    rows, heights, widths = [], [], []
    for chunk in chunks:
        if len(chunk.indices) % process_count:
            raise ValueError(f"a chunk of {len(chunk.indices)} rows does not split over "
                             f"{process_count} hosts")
        local = len(chunk.indices) // process_count
        rows += chunk.indices[process_index * local:(process_index + 1) * local]
        heights += [chunk.resized_size[0]] * local
        widths += [chunk.resized_size[1]] * local
    if not rows:
        return
    load = _load_pair(split)

    def example(index, height, width):
        image, mask = load(index)
        return {"image": normalise(_resize_image(image, height, width)), "mask": mask}

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(rows, np.int64), heights, widths))
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    examples = ClosingIterator(ds.prefetch(tf.data.AUTOTUNE))
    try:
        for chunk in chunks:
            local = len(chunk.indices) // process_count
            items = [next(examples) for _ in range(local)]
            valid = chunk.valid[process_index * local:(process_index + 1) * local]
            yield {"image": np.stack([x["image"] for x in items]),
                   "mask": np.stack([x["mask"] for x in items]), "valid": valid}
    finally:
        examples.close()


def make_resized_iterator(split: SegmentationSplit, *, image_size: int, global_batch_size: int,
                          process_index: int = 0, process_count: int = 1
                          ) -> Iterator[dict[str, np.ndarray]]:
    """Yields one pass of this host's batches of square-resized pairs, the "fast" protocol's
    input: {"image" (b, S, S, 3) normalised, "mask" (b, S, S) uint8 (nearest), "valid" (b,)};
    the last batch is padded (mask 255, valid False), every host yields as many batches."""
    if global_batch_size % process_count:
        raise ValueError(f"batch size {global_batch_size} must be divisible by the "
                         f"{process_count} hosts")
    local = global_batch_size // process_count
    count = len(split)
    num_batches = -(-count // global_batch_size)
    load = _load_pair(split)

    def example(position):
        valid = position < count
        image, mask = load(tf.minimum(position, count - 1))
        return {"image": normalise(_resize_image(image, image_size, image_size)),
                "mask": tf.where(valid, _resize_mask(mask, image_size, image_size),
                                 tf.constant(IGNORE_LABEL, tf.uint8)),
                "valid": valid}

    positions = tf.data.Dataset.range(num_batches * local).map(
        lambda r: (r // local) * global_batch_size + process_index * local + r % local)
    ds = positions.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ClosingIterator(ds.batch(local).prefetch(tf.data.AUTOTUNE))
