"""Images with segmentation masks, for linear segmentation (evaluate/segment.py).

Sources: a TFDS dataset whose examples hold `image` and `segmentation_mask` (e.g.
`oxford_iiit_pet`), or `folder:PATH` with PATH/<split>/images/NAME.(jpg|png) and
PATH/<split>/masks/NAME.png (a class index per pixel, 255 = ignore: Pascal VOC's
SegmentationClass PNGs are in this form). Images are resized bilinearly and masks by
nearest neighbour to a square of image_size (no augmentation); one pass, the last batch padded
with masks of 255 and `valid` False.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from vicregl_jax.data import augment

IGNORE_LABEL = 255
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _folder_pairs(root: str, split: str) -> tuple[list[str], list[str]]:
    images_dir, masks_dir = os.path.join(root, split, "images"), os.path.join(root, split, "masks")
    if not os.path.isdir(images_dir) or not os.path.isdir(masks_dir):
        raise FileNotFoundError(
            f"{root} has no {split}/images and {split}/masks folders: lay out a segmentation folder as "
            f"PATH/{split}/images/NAME.jpg + PATH/{split}/masks/NAME.png (class indices, 255 = ignore)."
        )
    images, masks, missing = [], [], []
    for name in sorted(os.listdir(images_dir)):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        mask = os.path.join(masks_dir, stem + ".png")
        if not os.path.exists(mask):
            missing.append(name)
            continue
        images.append(os.path.join(images_dir, name))
        masks.append(mask)
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {images_dir} have no mask in {masks_dir}, e.g. {missing[:3]}.")
    if not images:
        raise FileNotFoundError(f"No images in {images_dir}.")
    return images, masks


def _decode_pair(image_bytes, mask_bytes):
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    mask = tf.io.decode_png(mask_bytes, channels=1)
    return image, mask


def segmentation_dataset(dataset: str, split: str, *, data_dir: str | None = None) -> tuple[tf.data.Dataset, int]:
    """Returns (tf.data.Dataset of (uint8 image (H, W, 3), uint8 mask (H, W, 1)), number of examples)."""
    if dataset.startswith("folder:"):
        images, masks = _folder_pairs(dataset[len("folder:"):], split)
        ds = tf.data.Dataset.from_tensor_slices((images, masks))
        return ds.map(lambda i, m: _decode_pair(tf.io.read_file(i), tf.io.read_file(m))), len(images)
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"{dataset!r} is not a TFDS dataset; use a TFDS name with segmentation masks or folder:PATH.") from e
    if "segmentation_mask" not in builder.info.features:
        raise ValueError(
            f"The TFDS dataset {dataset!r} has no 'segmentation_mask' feature (it has {list(builder.info.features)}); "
            "use one that does (e.g. oxford_iiit_pet) or folder:PATH."
        )
    if not builder.is_prepared():
        from vicregl_jax.data.sources import preparation_lock

        with preparation_lock(builder):  # one process prepares; the others then find it done
            builder = tfds.builder(dataset, data_dir=data_dir)
            if not builder.is_prepared():
                builder.download_and_prepare()
    ds = builder.as_dataset(split=split, shuffle_files=False)
    count = builder.info.splits[split].num_examples
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["segmentation_mask"], tf.uint8))), count


def make_segmentation_iterator(dataset: str, split: str, *, global_batch_size: int, image_size: int,
                               data_dir: str | None = None, process_index: int = 0, process_count: int = 1):
    """Yields this host's batches {"image" (B, S, S, 3) normalised, "mask" uint8 (B, S, S), "valid" (B,)}."""
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by the {process_count} hosts.")
    local = global_batch_size // process_count
    ds, count = segmentation_dataset(dataset, split, data_dir=data_dir)
    ds = ds.shard(process_count, process_index)
    # Every host yields the same number of batches (collectives need it): the largest shard's.
    num_batches = -(-(-(-count // process_count)) // local)

    def prepare(image, mask):
        image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size], method="bilinear", antialias=True)
        image = augment.normalise(tf.clip_by_value(image, 0.0, 255.0) / 255.0)
        mask = tf.image.resize(mask, [image_size, image_size], method="nearest")[..., 0]
        return {"image": image, "mask": tf.cast(mask, tf.uint8), "valid": tf.constant(True)}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    empty = {
        "image": np.zeros((0, image_size, image_size, 3), np.float32),
        "mask": np.zeros((0, image_size, image_size), np.uint8),
        "valid": np.zeros(0, bool),
    }
    batches = ds.batch(local).prefetch(2).as_numpy_iterator()
    for _ in range(num_batches):
        batch = next(batches, empty)
        n = len(batch["valid"])
        if n < local:  # pad so that every host yields whole batches
            pad = local - n
            batch = {
                "image": np.concatenate([batch["image"], np.zeros((pad, *batch["image"].shape[1:]), np.float32)]),
                "mask": np.concatenate([batch["mask"], np.full((pad, image_size, image_size), IGNORE_LABEL, np.uint8)]),
                "valid": np.concatenate([batch["valid"], np.zeros(pad, bool)]),
            }
        yield batch
