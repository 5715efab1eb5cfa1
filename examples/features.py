"""VICRegL's features of your images, from the release's weights (or a workdir), in a few lines.

    python examples/features.py photo.jpg                      # one image
    python examples/features.py photo.jpg other.jpg            # and its matches in another
    python examples/features.py photo.jpg --weights=convnext_small_alpha0.75 --size=448

Downloads the weights once (into $VICREGL_JAX_CACHE, default ~/.cache/vicregl_jax), prints
the features' shapes, and writes into --out:
  pca.png              each image beside the first three principal components of its dense
                       features as colours;
  correspondences.png  two overlapping crops of the first image, a line from every cell of
                       the left one to its nearest neighbour (feature distance) in the right
                       one: green where it lands within one cell of the truth, red otherwise;
  matches.png          with a second image: the mutual nearest neighbours between the two.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

import vicregl_jax
from vicregl_jax import extract, viz


def read_rgb(path: str) -> np.ndarray:
    """Returns the uint8 (H, W, 3) RGB pixels of an image file."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def overlapping_crops(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns two square crops (2, size, size, 3) of the image resized to short side
    size * 5 / 4, a quarter of a crop apart both ways, and their boxes (top, left, height,
    width) in the image's pixels."""
    resized = extract.preprocess([image], resize=size * 5 // 4)[0][0]
    scale, shift = image.shape[0] / resized.shape[0], size // 4
    corners = [(0, 0), (shift, shift)]
    crops = np.stack([resized[t : t + size, s : s + size] for t, s in corners])
    return crops, np.array([(t * scale, s * scale, size * scale, size * scale) for t, s in corners])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="one or two image files")
    parser.add_argument("--weights", default="resnet50_alpha0.9", help="a released model's name, a .pth or a workdir")
    parser.add_argument("--size", type=int, default=448, help="side of the square centre crop the model sees")
    parser.add_argument("--out", default="features_out", help="folder for the pictures")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    model, config = vicregl_jax.load(args.weights)
    images = [read_rgb(path) for path in args.images[:2]]
    out = vicregl_jax.features(model, images, resize=args.size, crop=args.size)
    print(
        f"{args.weights} ({config.model.arch}): pooled {out.pooled.shape} {out.pooled.dtype}, "
        f"maps {out.maps.shape}, locations {out.locations.shape}"
    )

    shown = extract.preprocess(images, resize=args.size, crop=args.size)[0]
    maps = np.asarray(out.maps)
    viz.save_pca_picture(
        os.path.join(args.out, "pca.png"), [(os.path.basename(p), s, m) for p, s, m in zip(args.images, shown, maps)]
    )

    crops, boxes = overlapping_crops(images[0], args.size)
    pair = vicregl_jax.Extractor(model)(crops, boxes)
    pair_maps = np.asarray(pair.maps)
    correct = viz.save_correspondence_picture(
        os.path.join(args.out, "correspondences.png"),
        crops[0],
        crops[1],
        pair_maps[0].reshape(-1, pair_maps.shape[-1]),
        pair_maps[1].reshape(-1, pair_maps.shape[-1]),
        pair.locations[0],
        pair.locations[1],
        title="nearest neighbours between two crops",
    )
    print(f"correspondences between two crops: {100 * correct:.1f}% within one cell of the truth")

    if len(images) == 2:
        found = viz.save_matches_picture(
            os.path.join(args.out, "matches.png"),
            images[0],
            images[1],
            maps[0],
            maps[1],
            out.locations[0],
            out.locations[1],
        )
        print(f"{found} mutual nearest neighbours between the two images")
    print(f"pictures in {args.out}/")


if __name__ == "__main__":
    main()
