"""Random-access image datasets: example index -> (encoded image bytes, label), in tf.data.

The pipeline asks for example i of the dataset at any moment (a stateless global shuffle),
so every source here reads by index:

- a TFDS dataset stored as ArrayRecord (`tfds build --file_format=array_record`, or
  converted with `tfds convert_format`): TFDS's random-access data source;
- a TFDS dataset stored as TFRecord (sequential files) small enough for memory: its encoded
  images are read once into host memory (`max_in_memory_bytes`);
- `folder:/path`: image files, read by path;
- the embedded datasets (`vicregl_photos`, `vicregl_digits`): built on first use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vicregl_jax import distributed
from vicregl_jax.data import embedded, folder

FOLDER_PREFIX = "folder:"
DEFAULT_MAX_IN_MEMORY_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """A dataset read by index: `lookup` (Python) then `parse` (TF graph) give (bytes, label)."""

    name: str
    num_examples: int
    num_classes: int  # 0 when the dataset has no labels
    lookup: Callable[[int], tuple[bytes, int]]  # index -> (record, label)
    parse: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]  # -> (image bytes, label)

    def fetch(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns example `index` as (encoded image: tf.string scalar, label: int32 scalar)."""

        def lookup(i):
            record, label = self.lookup(int(i))
            return np.asarray(record, dtype=object), np.int64(label)

        record, label = tf.numpy_function(lookup, [index], [tf.string, tf.int64], stateful=False)
        record.set_shape([])
        label.set_shape([])
        image, label = self.parse(record, label)
        return image, tf.cast(label, tf.int32)


def _identity(record, label):
    return record, label


def folder_source(path: str, split: str) -> ImageSource:
    """Returns the source of a folder of images (class sub-folders give labels)."""
    directory = folder.resolve_split_dir(path, split)
    paths, labels, class_names = folder.list_image_folder(directory)
    encoded = [p.encode() for p in paths]
    return ImageSource(
        name=f"{FOLDER_PREFIX}{directory}",
        num_examples=len(paths),
        num_classes=len(class_names),
        lookup=lambda i: (encoded[i], labels[i]),
        parse=lambda record, label: (tf.io.read_file(record), label),
    )


def _image_and_label_keys(builder) -> tuple[str, str | None, int]:
    """Returns the feature keys of the image and of the class label, and the class count."""
    features = builder.info.features
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if not image_keys:
        raise ValueError(
            f"TFDS dataset {builder.name!r} has no top-level Image feature (features: "
            f"{list(features)}): use an image-classification dataset."
        )
    image_key = "image" if "image" in image_keys else image_keys[0]
    label_key = None
    for key in ("label", *features):
        if key in features and isinstance(features[key], tfds.features.ClassLabel):
            label_key = key
            break
    num_classes = features[label_key].num_classes if label_key else 0
    return image_key, label_key, num_classes


@contextlib.contextmanager
def preparation_lock(builder):
    """Holds an exclusive lock while one process prepares a dataset, so that independent
    processes sharing a local data_dir (two runs, test workers) do not prepare it into each
    other (TFDS renames its incomplete folder at the end: the second rename fails). No lock on
    remote file systems (gs://): the processes of one run take turns through the coordination
    service instead (_prepare)."""
    root = str(builder.data_dir_root)
    if "://" in root:
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{builder.name}.prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(builder, manual_dir: str | None):
    """Prepares a TFDS dataset in ArrayRecord format and returns its builder, or says how to
    get it. The processes of one run prepare it once: process 0 does, the others wait."""
    name = builder.name
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual = manual_dir or os.path.join(builder.data_dir_root, "downloads", "manual")
        if not (tf.io.gfile.isdir(manual) and tf.io.gfile.listdir(manual)):
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root} and needs files "
                f"downloaded by hand. Put them in a directory and pass manual_dir= (tried "
                f"{manual!r}); the first run then prepares the dataset. Or prepare it "
                f"yourself: `tfds build {name} --manual_dir=DIR --data_dir=DATA_DIR "
                f"--file_format=array_record`. What to download:\n"
                f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}"
            )
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    root = str(builder.data_dir_root)

    def prepare_unless_prepared():
        with preparation_lock(builder):
            # Another process (process 0 of this run, a test worker) may have prepared it.
            fresh = tfds.builder(name, data_dir=root)
            if fresh.is_prepared():
                return fresh
            builder.download_and_prepare(download_config=config, file_format="array_record")
            return builder

    try:
        # In a run of several processes, process 0 prepares and the others wait for it (then
        # find it prepared): hosts sharing a gs:// data_dir, where no lock exists, would each
        # build it for hours and race on the final rename.
        return distributed.first_process_then_others(f"tfds_prepare/{name}/{root}", root, prepare_unless_prepared)
    except Exception as error:  # noqa: BLE001 - re-raised with what to do
        fresh = tfds.builder(name, data_dir=root)
        if fresh.is_prepared():  # prepared meanwhile by a process that does not share this run
            return fresh
        raise FileNotFoundError(
            f"could not prepare TFDS dataset {name!r} in {builder.data_dir_root} ({error}). "
            f"Prepare it on a machine with network access: `tfds build {name} "
            f"--data_dir=DATA_DIR --file_format=array_record`, then pass data_dir=DATA_DIR."
        ) from error


def _in_memory_source(builder, split, image_key, label_key, num_classes, max_bytes) -> ImageSource:
    """Returns a source holding the encoded images of a TFRecord-stored split in memory."""
    info = builder.info.splits[split]
    size = getattr(info, "num_bytes", 0) or 0
    if size > max_bytes:
        raise ValueError(
            f"TFDS dataset {builder.name!r} is stored as TFRecord, which cannot be read by "
            f"index, and split {split!r} ({size / 2**30:.1f} GiB) exceeds "
            f"max_in_memory_bytes={max_bytes}. Convert it once to ArrayRecord: `tfds "
            f"convert_format --dataset_dir={builder.data_dir} --out_file_format=array_record`"
            ", or raise max_in_memory_bytes."
        )
    dataset = builder.as_dataset(
        split, decoders={image_key: tfds.decode.SkipDecoding()}, shuffle_files=False
    )
    images, labels = [], []
    for example in dataset.as_numpy_iterator():
        images.append(example[image_key])
        labels.append(int(example[label_key]) if label_key else -1)
    return ImageSource(
        name=f"{builder.name}:{split}",
        num_examples=len(images),
        num_classes=num_classes,
        lookup=lambda i: (images[i], labels[i]),
        parse=_identity,
    )


def tfds_source(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES,
) -> ImageSource:
    """Returns the source of a TFDS image dataset, preparing it (ArrayRecord) if needed."""
    embedded.register()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"unknown dataset {name!r}: give a TFDS name (e.g. 'imagenet2012', 'imagenette'), "
            f"an embedded one ({', '.join(embedded.NAMES)}), or 'folder:/path/to/images'."
        ) from error
    if not builder.is_prepared():
        builder = _prepare(builder, manual_dir)
    base_split = split.split("[")[0]
    if base_split not in builder.info.splits:
        raise ValueError(
            f"TFDS dataset {name!r} has no split {split!r}: choose one of "
            f"{sorted(builder.info.splits)} (slices such as 'train[:10%]' work too)."
        )
    image_key, label_key, num_classes = _image_and_label_keys(builder)
    try:
        records = builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
    except NotImplementedError:
        return _in_memory_source(
            builder, split, image_key, label_key, num_classes, max_in_memory_bytes
        )
    features = builder.info.features
    decoders = {image_key: tfds.decode.SkipDecoding()}

    def parse(record, _):
        example = features.deserialize_example(record, decoders=decoders)
        label = example[label_key] if label_key else tf.constant(-1, tf.int64)
        return example[image_key], label

    return ImageSource(
        name=f"{name}:{split}",
        num_examples=len(records),
        num_classes=num_classes,
        lookup=lambda i: (records[i], -1),
        parse=parse,
    )


def open_source(
    dataset: str,
    split: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES,
) -> ImageSource:
    """Returns the random-access source of `dataset` ('folder:/path' or a TFDS name) and split."""
    if dataset.startswith(FOLDER_PREFIX):
        return folder_source(dataset[len(FOLDER_PREFIX) :], split)
    return tfds_source(
        dataset,
        split,
        data_dir=data_dir,
        manual_dir=manual_dir,
        max_in_memory_bytes=max_in_memory_bytes,
    )
