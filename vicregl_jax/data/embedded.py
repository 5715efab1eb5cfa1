"""Datasets that need no network: TFDS builders over images shipped inside pip packages.

- `vicregl_photos` (split "train", unlabelled, 76 JPEG photos): the 19 natural photos of
  scikit-image's `skimage.data` and scikit-learn's `load_sample_images` (11 in colour:
  astronaut, chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry, retina, both
  views of stereo_motorcycle, china, flower; 8 grey, stored as RGB: camera, coins, moon,
  clock, grass, gravel, brick, cell). Each photo is shrunk to at most 512 px on its long
  side and appears 4 times: whole, and three fixed crops of 70 % of each side (top-left,
  bottom-right, centre), enough distinct images for batches of 16-64 in demos and tests.
- `vicregl_digits` (splits "train" 1498 / "test" 299, labels 0-9): scikit-learn's
  `load_digits` 8 x 8 digits, rescaled to 32 x 32 (bicubic), grey replicated to RGB,
  PNG. Every sixth digit (index % 6 == 5) is in "test".

Both build in seconds from the installed packages, as ArrayRecord (random access), into
`data_dir` (default ~/tensorflow_datasets). The pipeline builds them on first use.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAMES = ("vicregl_photos", "vicregl_digits")

_COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
_GREY_PHOTOS = ("camera", "coins", "moon", "clock", "grass", "gravel", "brick", "cell")
MAX_PHOTO_SIDE = 512
CROP_FRACTION = 0.7


def natural_photos() -> list[tuple[str, np.ndarray]]:
    """Returns (name, uint8 RGB array) of the natural photos shipped in skimage and sklearn."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [(name, getattr(skimage.data, name)()) for name in _COLOUR_PHOTOS]
    left, right, _ = skimage.data.stereo_motorcycle()
    photos += [("stereo_motorcycle_left", left), ("stereo_motorcycle_right", right)]
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        photos.append((path.rsplit("/", 1)[-1].split(".")[0], image))
    for name in _GREY_PHOTOS:
        grey = getattr(skimage.data, name)()
        photos.append((name, np.repeat(grey[..., None], 3, axis=-1)))
    return [(name, np.ascontiguousarray(image[..., :3], np.uint8)) for name, image in photos]


def shrink(image: np.ndarray, max_side: int = MAX_PHOTO_SIDE) -> np.ndarray:
    """Returns the image resized (bicubic) so that its longer side is at most max_side."""
    height, width = image.shape[:2]
    factor = max_side / max(height, width)
    if factor >= 1.0:
        return image
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def photo_variants(image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Returns the whole image and its three fixed crops of CROP_FRACTION of each side."""
    height, width = image.shape[:2]
    ch, cw = round(height * CROP_FRACTION), round(width * CROP_FRACTION)
    corners = {
        "top_left": (0, 0),
        "bottom_right": (height - ch, width - cw),
        "centre": ((height - ch) // 2, (width - cw) // 2),
    }
    crops = [(k, image[t : t + ch, left : left + cw]) for k, (t, left) in corners.items()]
    return [("whole", image)] + crops


def _dataset_info(builder, features: dict, supervised_keys: tuple[str, str] | None = None):
    """Returns the DatasetInfo of an embedded builder: this module's description and the features."""
    return builder.dataset_info_from_configs(
        description=__doc__, features=tfds.features.FeaturesDict(features), supervised_keys=supervised_keys
    )


class VicreglPhotos(tfds.core.GeneratorBasedBuilder):
    """Unlabelled natural photos shipped with scikit-image and scikit-learn (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "19 photos, each whole and in three fixed crops."}

    def _info(self):
        return _dataset_info(
            self,
            {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"), "name": tfds.features.Text()},
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything ships with the installed packages
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for name, photo in natural_photos():
            for variant, image in photo_variants(shrink(photo)):
                key = f"{name}_{variant}"
                yield key, {"image": np.ascontiguousarray(image), "name": key}


DIGIT_SIZE = 32


def digit_images(size: int = DIGIT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits as uint8 RGB (N, size, size, 3) and int labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    resized = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC)) for g in grey])
    return np.repeat(resized[..., None], 3, axis=-1), digits.target.astype(np.int64)


class VicreglDigits(tfds.core.GeneratorBasedBuilder):
    """Labelled 32 x 32 RGB digits from scikit-learn's load_digits (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "load_digits at 32 x 32, train 1498 / test 299."}

    def _info(self):
        image = tfds.features.Image(shape=(DIGIT_SIZE, DIGIT_SIZE, 3), encoding_format="png")
        return _dataset_info(
            self, {"image": image, "label": tfds.features.ClassLabel(num_classes=10)}, ("image", "label")
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(test=False), "test": self._generate_examples(test=True)}

    def _generate_examples(self, test: bool):
        images, labels = digit_images()
        for index, (image, label) in enumerate(zip(images, labels)):
            if (index % 6 == 5) == test:
                yield index, {"image": image, "label": label}


def register() -> None:
    """Makes the embedded builders known to tfds.builder (defining the classes did it)."""
    assert all(name in tfds.list_builders(with_community_datasets=False) for name in NAMES)
