"""Writes the manifest of an image folder, so that `folder:` datasets list it with one read.

    python -m vicregl_jax.data.manifest /data/imagenet22k                # walks the folder once
    gcloud storage ls -r 'gs://BUCKET/imagenet22k/**' > listing.txt      # a bucket: list it fast,
    python -m vicregl_jax.data.manifest gs://BUCKET/imagenet22k --listing=listing.txt

The manifest (vicregl_manifest.txt inside the folder) holds the class names and every image's
path relative to the folder, in the order `folder:` datasets use; the run reads it instead of
walking the folder. Write it again whenever images are added or removed: a run trusts it. A
folder with split sub-folders (train/, val/) needs one manifest per split folder.
"""

from __future__ import annotations

import argparse
import os
import sys

import tensorflow as tf

from vicregl_jax.data import folder


def write_manifest(directory: str, listing: str | None = None) -> tuple[str, int, int]:
    """Writes directory's manifest from a walk, or from a file of object paths (`listing`,
    '-' for stdin); returns (manifest path, image count, class count)."""
    if listing is None:
        if not tf.io.gfile.isdir(directory):
            raise FileNotFoundError(
                f"{directory!r} is not a folder: give the folder that holds the images (or their class sub-folders)."
            )
        paths, labels, class_names = folder.walk_image_folder(directory)
    else:
        source = sys.stdin if listing == "-" else open(listing)
        with source:
            paths, labels, class_names = folder.listing_to_images(directory, source)
    if not paths:
        raise FileNotFoundError(
            f"no images ({', '.join(folder.IMAGE_EXTENSIONS)}) under {directory!r}"
            + (f" in the listing {listing!r}" if listing else "")
            + "."
        )
    target = os.path.join(directory, folder.MANIFEST_NAME)
    # Written beside, then renamed: a run never reads half a manifest.
    partial = target + ".partial"
    with tf.io.gfile.GFile(partial, "w") as f:
        f.write(folder.manifest_text(directory, paths, labels, class_names))
    tf.io.gfile.rename(partial, target, overwrite=True)
    return target, len(paths), len(class_names)


def main(argv=None) -> int:
    """Writes the manifests of the folders on the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m vicregl_jax.data.manifest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", nargs="+", help="image folders (local or gs://)")
    parser.add_argument(
        "--listing",
        help="a file of the folder's object paths, one per line ('-': stdin), "
        "instead of walking it; with one folder only",
    )
    args = parser.parse_args(argv)
    if args.listing and len(args.directory) > 1:
        parser.error("--listing describes one folder: give one directory with it")
    for directory in args.directory:
        target, images, classes = write_manifest(directory, args.listing)
        print(f"{target}: {images} images" + (f" in {classes} classes" if classes else " (no class folders)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
