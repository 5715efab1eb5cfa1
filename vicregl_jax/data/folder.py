"""A folder of images as a dataset; class sub-folders give labels, as ImageFolder does.

A folder is listed from its manifest when it has one (MANIFEST_NAME inside it, written once by
`python -m vicregl_jax.data.manifest DIR`): one read, however many files, instead of a walk
that costs a metadata request per entry (14M of them for ImageNet-22k on gs:// or Lustre).
"""

from __future__ import annotations

import logging
import os
import stat

import tensorflow as tf

# Formats that tf.io.decode_image reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
MANIFEST_NAME = "vicregl_manifest.txt"
MANIFEST_HEADER = "# vicregl_jax manifest 1"
# Walking more files than this (or any remote folder) logs how to write a manifest.
WALK_HINT_FILES = 100_000


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


def _no_images_error(directory: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {directory!r}: put the images "
        "there, or one sub-folder of images per class."
    )


def list_image_folder(directory: str) -> tuple[list[str], list[int], list[str]]:
    """Returns (paths, labels, class_names) of the images under `directory`, in sorted order.

    With class sub-folders, each image below sub-folder k (at any depth) gets label k, the
    sub-folders sorted by name. With no sub-folder, the images in `directory` itself get
    label -1 (unlabelled). Read from the folder's manifest when it has one, else walked.
    """
    listed = read_manifest(directory)
    if listed is None:
        listed = walk_image_folder(directory)
        if "://" in directory or len(listed[0]) > WALK_HINT_FILES:
            logging.warning(
                "Listed %d images in %s by walking it; write its manifest once (`python -m "
                "vicregl_jax.data.manifest %s`) and every later run lists it with one read.",
                len(listed[0]),
                directory,
                directory,
            )
    if not listed[0]:
        raise _no_images_error(directory)
    return listed


class _LocalWalk:
    """Walks local folders following each symlinked folder once, by real path, and keeps only
    regular files: a link back up the tree (a loop) or a second link to a folder already
    walked is skipped, and so are FIFOs, sockets and devices named like images (reading a FIFO
    would block forever). Counts what it skipped."""

    def __init__(self):
        self.seen: set[str] = set()
        self.skipped_links = 0
        self.skipped_files = 0

    def images(self, directory: str) -> list[str]:
        """Returns the regular image files below `directory` (any depth), sorted."""
        found = []
        for folder, subfolders, files in os.walk(directory, followlinks=True):
            real = os.path.realpath(folder)
            if real in self.seen:
                self.skipped_links += 1
                subfolders[:] = []
                continue
            self.seen.add(real)
            found.extend(p for p in (os.path.join(folder, f) for f in files if _is_image(f)) if self.regular(p))
        return sorted(found)

    def regular(self, path: str) -> bool:
        """Returns whether path (links followed) is a regular file; counts it when not."""
        try:
            ok = stat.S_ISREG(os.stat(path).st_mode)
        except OSError:  # a dangling link: reading it fails the same way later; keep it out
            ok = False
        self.skipped_files += not ok
        return ok

    def warn(self, directory: str) -> None:
        if self.skipped_links or self.skipped_files:
            logging.warning(
                "Listing %s: skipped %d folder links already walked (links back up the tree or second links to a "
                "folder) and %d entries that are not regular files (FIFOs, sockets, devices, dangling links).",
                directory,
                self.skipped_links,
                self.skipped_files,
            )


def walk_image_folder(directory: str) -> tuple[list[str], list[int], list[str]]:
    """Returns (paths, labels, class_names) as list_image_folder does, by walking the folder."""
    entries = sorted(tf.io.gfile.listdir(directory))
    class_names = [e.rstrip("/") for e in entries if tf.io.gfile.isdir(os.path.join(directory, e))]
    paths, labels = [], []
    remote = "://" in directory
    walk = _LocalWalk()
    if not remote:
        walk.seen.add(os.path.realpath(directory))
    if class_names:
        for label, name in enumerate(class_names):
            if remote:  # object stores have neither links nor special files
                found = sorted(
                    os.path.join(folder, f)
                    for folder, _, files in tf.io.gfile.walk(os.path.join(directory, name))
                    for f in files
                    if _is_image(f)
                )
            else:
                found = walk.images(os.path.join(directory, name))
            paths.extend(found)
            labels.extend([label] * len(found))
    else:
        paths = [os.path.join(directory, e) for e in entries if _is_image(e)]
        if not remote:
            paths = [p for p in paths if walk.regular(p)]
        labels = [-1] * len(paths)
    walk.warn(directory)
    return paths, labels, class_names


def manifest_text(directory: str, paths: list[str], labels: list[int], class_names: list[str]) -> str:
    """Returns the manifest of a listing: a header, the class names (tab-separated, in label
    order, so that empty classes keep their labels), the image count, then one path per line
    relative to `directory`, in listing order."""
    prefix = directory.rstrip("/") + "/"
    index = {name: k for k, name in enumerate(class_names)}
    lines = [MANIFEST_HEADER, "# classes\t" + "\t".join(class_names), f"# images\t{len(paths)}"]
    for path, label in zip(paths, labels):
        if not path.startswith(prefix):
            raise ValueError(f"{path!r} is not inside {directory!r}")
        relative = path[len(prefix) :]
        if any(c in relative for c in "\n\r\t"):
            raise ValueError(f"{path!r}: a file name with a tab or a line break cannot go in a manifest; rename it.")
        expected = index.get(relative.split("/", 1)[0]) if class_names else -1
        if label != expected:
            raise ValueError(f"{path!r} has label {label} but lies in class folder {expected}")
        lines.append(relative)
    return "\n".join(lines) + "\n"


def parse_manifest(directory: str, text: str) -> tuple[list[str], list[int], list[str]]:
    """Returns (paths, labels, class_names) from a manifest's text (see manifest_text)."""
    where = os.path.join(directory, MANIFEST_NAME)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if (
        len(lines) < 3
        or lines[0] != MANIFEST_HEADER
        or not lines[1].startswith("# classes")
        or not lines[2].startswith("# images\t")
    ):
        raise ValueError(
            f"{where} is not a vicregl_jax manifest: delete it, or write it again with "
            f"`python -m vicregl_jax.data.manifest {directory}`."
        )
    class_names = [c for c in lines[1].split("\t")[1:] if c]
    relative = lines[3:]
    if len(relative) != int(lines[2].split("\t")[1]):
        raise ValueError(
            f"{where} lists {len(relative)} images but says {lines[2].split(chr(9))[1]}: it was cut "
            f"short; write it again with `python -m vicregl_jax.data.manifest {directory}`."
        )
    base = directory.rstrip("/")
    paths = [f"{base}/{r}" for r in relative]
    if class_names:
        index = {name: k for k, name in enumerate(class_names)}
        try:
            labels = [index[r.split("/", 1)[0]] for r in relative]
        except KeyError as error:
            raise ValueError(f"{where} lists an image outside its classes ({error}): write it again.") from None
    else:
        labels = [-1] * len(paths)
    return paths, labels, class_names


def read_manifest(directory: str) -> tuple[list[str], list[int], list[str]] | None:
    """Returns (paths, labels, class_names) from directory's manifest, or None without one."""
    try:
        with tf.io.gfile.GFile(os.path.join(directory, MANIFEST_NAME), "r") as f:
            text = f.read()
    except tf.errors.NotFoundError:
        return None
    return parse_manifest(directory, text)


def listing_to_images(directory: str, urls) -> tuple[list[str], list[int], list[str]]:
    """Returns (paths, labels, class_names) as list_image_folder would give them, from a flat
    list of the object paths under `directory` (`gcloud storage ls -r 'DIR/**'`): lines that
    end in '/' or ':' (folder headers) and blank lines are skipped, as are files outside it."""
    prefix = directory.rstrip("/") + "/"
    files = sorted({u.strip() for u in urls if u.strip() and not u.strip().endswith(("/", ":"))})
    files = [f for f in files if f.startswith(prefix)]
    class_names = sorted({f[len(prefix) :].split("/", 1)[0] for f in files if "/" in f[len(prefix) :]})
    if class_names:
        index = {name: k for k, name in enumerate(class_names)}
        images = [f for f in files if "/" in f[len(prefix) :] and _is_image(f)]
        by_class: dict[int, list[str]] = {}
        for f in images:
            by_class.setdefault(index[f[len(prefix) :].split("/", 1)[0]], []).append(f)
        paths, labels = [], []
        for label in range(len(class_names)):
            found = sorted(by_class.get(label, []))
            paths.extend(found)
            labels.extend([label] * len(found))
        return paths, labels, class_names
    paths = [f for f in files if _is_image(f)]
    return paths, [-1] * len(paths), []
