"""Semantic segmentation datasets in the folders people download: layouts, file lists, masks.

Datasets are named "LAYOUT:PATH":

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
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from vicregl_jax.data.segmentation.classes import ADE20K_CLASSES, CITYSCAPES_CLASSES, VOC_CLASSES

IGNORE_LABEL = 255


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
    "voc": Layout(
        "voc",
        VOC_CLASSES,
        ("trainaug", "train", "val"),
        "trainaug",
        "val",
        (2048, 512),
        (512, 512),
        False,
        40_000,
        16,
        "/data/VOCdevkit",
    ),
    "ade20k": Layout(
        "ade20k",
        ADE20K_CLASSES,
        ("training", "validation"),
        "training",
        "validation",
        (2048, 512),
        (512, 512),
        True,
        160_000,
        16,
        "/data/ADEChallengeData2016",
    ),
    "cityscapes": Layout(
        "cityscapes",
        CITYSCAPES_CLASSES,
        ("train", "val"),
        "train",
        "val",
        (2048, 1024),
        (512, 1024),
        False,
        40_000,
        8,
        "/data/cityscapes",
    ),
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
        raise ValueError(f"segmentation dataset {spec!r}: name a layout and its folder, one of {examples}")
    return LAYOUTS[name], path


# ------------------------------------------------------------------------------ listing


def _join(*parts: str) -> str:
    return os.path.join(*parts)


def _require_dir(path: str, what: str, layout: Layout) -> None:
    if not tf.io.gfile.isdir(path):
        raise FileNotFoundError(
            f"{path} does not exist: the {layout.name} layout needs {what} "
            f"there (see the README's segmentation section)"
        )


def _files(directory: str) -> set[str]:
    """Returns the names in directory (one listing, also fast on gs://)."""
    return set(tf.io.gfile.listdir(directory))


def _missing_error(what: str, missing: list[str], total: int, where: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{len(missing)} of {total} {what} are missing from {where}, e.g. "
        f"{', '.join(missing[:3])}: the download is incomplete or in "
        "another layout"
    )


def _voc_root(root: str) -> str:
    for candidate in (_join(root, "VOC2012"), root):
        if tf.io.gfile.isdir(_join(candidate, "JPEGImages")):
            return candidate
    raise FileNotFoundError(
        f"{root} holds neither VOC2012/JPEGImages nor JPEGImages: pass the VOCdevkit folder of "
        "Pascal VOC 2012 (VOCtrainval_11-May-2012.tar), e.g. voc:/data/VOCdevkit"
    )


def _read_ids(path: str, layout: Layout, hint: str) -> list[str]:
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {hint}")
    with tf.io.gfile.GFile(path) as f:
        return [line.strip() for line in f if line.strip()]


def _list_voc(root: str, split: str, layout: Layout) -> tuple[list[str], list[str]]:
    base = _voc_root(root)
    sets = _join(base, "ImageSets", "Segmentation")
    parts = {
        "train": [("train.txt", "SegmentationClass")],
        "val": [("val.txt", "SegmentationClass")],
        "trainaug": [("train.txt", "SegmentationClass"), ("aug.txt", "SegmentationClassAug")],
    }
    aug_hint = (
        "make SegmentationClassAug/ and ImageSets/Segmentation/aug.txt from the SBD "
        "download (benchmark.tgz) with mmsegmentation's tools/convert_datasets/voc_aug.py, "
        "or use split 'train' (1,464 images, no SBD)"
    )
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
    return ([_join(images_dir, s + ".jpg") for s in stems], [_join(masks_dir, s + ".png") for s in stems])


def _list_cityscapes(root: str, split: str, layout: Layout) -> tuple[list[str], list[str]]:
    images_root = _join(root, "leftImg8bit", split)
    masks_root = _join(root, "gtFine", split)
    _require_dir(images_root, f"leftImg8bit/{split}/CITY/*_leftImg8bit.png (leftImg8bit_trainvaltest.zip)", layout)
    _require_dir(masks_root, f"gtFine/{split}/CITY/*_gtFine_labelTrainIds.png (gtFine_trainvaltest.zip)", layout)
    images, masks, missing, total = [], [], [], 0
    for city in sorted(tf.io.gfile.listdir(images_root)):
        city = city.rstrip("/")
        names = sorted(n for n in _files(_join(images_root, city)) if n.endswith("_leftImg8bit.png"))
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
            "mmsegmentation's tools/convert_datasets/cityscapes.py)"
        )
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
        raise FileNotFoundError(
            f"{root} does not exist: pass the folder of the {layout.name} "
            f"download, e.g. {layout.name}:{layout.example_path}"
        )
    images, masks = _LISTERS[layout.name](root, split, layout)
    if not images:
        raise FileNotFoundError(f"no images in split {split!r} of {spec}")
    return SegmentationSplit(layout, root, split, tuple(images), tuple(masks))


# -------------------------------------------------------------------------------- masks


def decode_mask(data: bytes, *, num_classes: int, reduce_zero_label: bool = False, name: str = "mask") -> np.ndarray:
    """Returns the class indices (H, W) uint8 of a PNG mask (255 = ignore).

    Palette PNGs give their palette indices and grey-level ones their values (PIL), never
    the colours. With reduce_zero_label, 0 becomes 255 and the other labels drop by one.
    Labels >= num_classes other than 255 raise ValueError (a mask of another dataset, or
    colours instead of indices).
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(
                f"{name} is a {image.mode} image: masks must hold class indices "
                "(palette or grey-level PNG), not colours"
            )
        mask = np.asarray(image)
    if mask.ndim != 2 or mask.max(initial=0) > 255:
        raise ValueError(f"{name}: expected one channel of class indices 0-255")
    mask = mask.astype(np.uint8)
    if reduce_zero_label:
        # 0 ("other") is ignored; the uint8 wrap sends it to 255 and keeps 255 there.
        mask = np.where(mask == IGNORE_LABEL, IGNORE_LABEL, mask - np.uint8(1)).astype(np.uint8)
    bad = (mask >= num_classes) & (mask != IGNORE_LABEL)
    if bad.any():
        raise ValueError(
            f"{name} holds label {int(mask[bad][0])} but the dataset has "
            f"{num_classes} classes (0-{num_classes - 1}, 255 ignored): is it a "
            "colour-coded mask, or a mask of another dataset?"
        )
    return mask


def read_mask(path: str, *, num_classes: int, reduce_zero_label: bool = False) -> np.ndarray:
    """Returns the class indices (H, W) uint8 of the PNG mask at path (see decode_mask)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        return decode_mask(f.read(), num_classes=num_classes, reduce_zero_label=reduce_zero_label, name=path)


def image_size(path: str) -> tuple[int, int]:
    """Returns (height, width) of an image file, from its header."""
    with tf.io.gfile.GFile(path, "rb") as f, Image.open(f) as image:
        return image.height, image.width


def image_sizes(paths: Sequence[str], threads: int = 16) -> list[tuple[int, int]]:
    """Returns (height, width) of every image, reading headers in parallel."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(image_size, paths))
