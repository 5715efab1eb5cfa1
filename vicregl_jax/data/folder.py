"""A folder of images as a dataset; class sub-folders give labels, as ImageFolder does."""
from __future__ import annotations

import os

import tensorflow as tf

# Formats that tf.io.decode_image reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def resolve_split_dir(root: str, split: str) -> str:
    """Returns root/split when that folder exists, else root itself for split "train"."""
    candidate = os.path.join(root, split) if split else root
    if split and tf.io.gfile.isdir(candidate):
        return candidate
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(
            f"folder dataset {root!r} does not exist: give 'folder:/path/to/images' where the "
            "folder holds images, or one sub-folder of images per class."
        )
    if split in ("", "train"):
        return root
    raise FileNotFoundError(
        f"folder dataset {root!r} has no sub-folder {split!r} for split {split!r}: create "
        f"{candidate} (class sub-folders inside), or use split='train' to read {root} itself."
    )


def list_image_folder(directory: str) -> tuple[list[str], list[int], list[str]]:
    """Returns (paths, labels, class_names) of the images under `directory`, in sorted order.

    With class sub-folders, each image below sub-folder k (at any depth) gets label k, the
    sub-folders sorted by name. With no sub-folder, the images in `directory` itself get
    label -1 (unlabelled).
    """
    entries = sorted(tf.io.gfile.listdir(directory))
    class_names = [e.rstrip("/") for e in entries if tf.io.gfile.isdir(os.path.join(directory, e))]
    paths, labels = [], []
    if class_names:
        for label, name in enumerate(class_names):
            found = []
            for folder, _, files in tf.io.gfile.walk(os.path.join(directory, name)):
                found.extend(os.path.join(folder, f) for f in files if _is_image(f))
            paths.extend(sorted(found))
            labels.extend([label] * len(found))
    else:
        paths = [os.path.join(directory, e) for e in entries if _is_image(e)]
        labels = [-1] * len(paths)
    if not paths:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {directory!r}: put the images "
            "there, or one sub-folder of images per class."
        )
    return paths, labels, class_names
