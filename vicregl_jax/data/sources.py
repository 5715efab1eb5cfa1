"""Random-access image datasets: example index -> (encoded image bytes, label), in tf.data.

The pipeline asks for example i of the dataset at any moment (a stateless global shuffle),
so every source here reads by index:

- a TFDS dataset stored as ArrayRecord (`tfds build --file_format=array_record`, or
  converted with `tfds convert_format`): TFDS's random-access data source, and each run of
  consecutive records asked for at once read by one ranged read (`RunReader`: one request
  to a bucket where TFDS's source makes one per record);
- a TFDS dataset stored as TFRecord (sequential files) small enough for memory: its encoded
  images are read once into host memory (`max_in_memory_bytes`);
- `folder:/path`: image files, read by path (a batch of files at once, by a pool of threads;
  one request per image on a bucket, whatever the order);
- the embedded datasets (`vicregl_photos`, `vicregl_digits`): built on first use.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from array_record.python import array_record_module

from vicregl_jax import coordination, storage_retries
from vicregl_jax.data import embedded, folder, prepare

FOLDER_PREFIX = "folder:"
DEFAULT_MAX_IN_MEMORY_BYTES = 2 << 30
# A 1 x 1 black PNG: what a position whose tries all failed is made of (the iterator raises).
PLACEHOLDER_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de000000"
    "0c49444154789c63606060000000040001f61738550000000049454e44ae426082"
)


class NotARegularFileError(OSError):
    """A listed path that is a FIFO, socket or device: opening it could block forever."""


# Read errors worth retrying (throttling, timeouts, a flaky network file system); a missing
# or forbidden file is not retried, nor any other error (a reader that fails for another
# reason, e.g. at interpreter shutdown, would fail again).
_PERMANENT_ERRORS = (
    FileNotFoundError,
    IsADirectoryError,
    PermissionError,
    NotARegularFileError,
    tf.errors.NotFoundError,
    tf.errors.PermissionDeniedError,
)
_TRANSIENT_ERRORS = (
    OSError,
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.ResourceExhaustedError,
    tf.errors.AbortedError,
    tf.errors.InternalError,
    tf.errors.UnknownError,
)
READ_TRIES = 5
READ_BACKOFF_S = 0.2  # doubled after each failed try: 0.2 + 0.4 + 0.8 + 1.6 s of waiting in all


def read_with_retries(
    read: Callable[[], Any], what: str, tries: int | None = None, backoff_s: float | None = None
) -> tuple[Any, str | None]:
    """Returns (read(), None), or (None, the error) once `tries` tries failed or the error is
    permanent (missing file). Transient errors are retried with exponential backoff."""
    tries = READ_TRIES if tries is None else tries
    backoff_s = READ_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(tries):
        try:
            return read(), None
        except _PERMANENT_ERRORS as error:
            return None, f"{what}: {type(error).__name__}: {error}"
        except _TRANSIENT_ERRORS as error:
            if attempt == tries - 1:
                return None, f"{what}: {type(error).__name__} after {tries} tries: {error}"
            logging.warning("Reading %s failed (%s); retrying in %.1f s.", what, error, backoff_s * 2**attempt)
            storage_retries.count("data reads")
            time.sleep(backoff_s * 2**attempt)
        except Exception as error:  # noqa: BLE001 - reported with the example, not lost
            return None, f"{what}: {type(error).__name__}: {error}"
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """A dataset read by index, a batch of indices at a time.

    `read_records(indices)` (Python, one call per batch) returns the raw records, their labels
    and the read errors (None where the read worked; failed reads were retried); `parse` (TF
    graph) turns a record and its label into (encoded image bytes, int32 label). `tf_read`,
    where the source has one, reads one record with TensorFlow ops only (no Python: what a
    tf.data service worker can run). `describe(index)` names an example in messages.
    `placeholder` is what `parse` would give for a position whose tries all failed (a black
    pixel, label -1): processed like any example, so that the batch keeps its shape.
    `reads_runs`: whether `read_records` reads a run of consecutive records with one request
    (then the training streams read in blocks; otherwise one record per read: data/stream.py).
    """

    name: str
    num_examples: int
    num_classes: int  # 0 when the dataset has no labels
    read_records: Callable[[Sequence[int]], tuple[list[bytes], list[int], list[str | None]]]
    parse: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
    describe: Callable[[int], str]
    tf_read: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None = None
    placeholder: tuple = (PLACEHOLDER_PNG, np.int64(-1))
    reads_runs: bool = False  # a run of consecutive records is one request (ArrayRecord): block reads pay

    def read_tf(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Returns (records: string (n,), labels: int64 (n,), read_ok: bool (n,)) of int64
        `indices` (n,), read in one Python call."""

        def read(batch):
            records, labels, errors = self.read_records([int(i) for i in batch])
            for error in errors:
                if error is not None:
                    logging.warning("Could not read %s", error)
            return (
                np.asarray([r if r is not None else b"" for r in records], dtype=object),
                np.asarray(labels, np.int64),
                np.asarray([e is None for e in errors]),
            )

        records, labels, ok = tf.numpy_function(read, [indices], [tf.string, tf.int64, tf.bool], stateful=False)
        for t in (records, labels, ok):
            t.set_shape(indices.shape)
        return records, labels, ok


def _identity(record, label):
    return record, label


# Threads that read the files of one batch at once: reads wait on storage, not the CPU.
_READERS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="vicregl_read")


def read_file(path: str) -> bytes:
    """Returns the bytes of a local or remote (gs://, s3://: TensorFlow's file systems) file."""
    if "://" in path:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotARegularFileError(f"{path} is not a regular file (a FIFO, socket or device); it is not read")
    with open(path, "rb") as f:
        return f.read()


def read_files(paths: Sequence[str]) -> tuple[list[bytes | None], list[str | None]]:
    """Returns the bytes of the files (None where a read failed) and the read errors (None
    where it worked), read at once by a pool of threads, transient errors retried."""
    results = list(_READERS.map(lambda path: read_with_retries(lambda: read_file(path), path), paths))
    return [r for r, _ in results], [e for _, e in results]


def folder_source(path: str, split: str) -> ImageSource:
    """Returns the source of a folder of images (class sub-folders give labels)."""
    directory = folder.resolve_split_dir(path, split)
    paths, labels, class_names = folder.list_image_folder(directory)

    def read_records(indices):
        records, errors = read_files([paths[i] for i in indices])
        return records, [labels[i] for i in indices], errors

    def tf_read(index):
        # The graph holds the paths: no Python involved (what a tf.data service worker runs).
        table, label_table = tf.constant(paths), tf.constant(labels, tf.int64)
        return tf.io.read_file(tf.gather(table, index)), tf.gather(label_table, index)

    return ImageSource(
        name=f"{FOLDER_PREFIX}{directory}",
        num_examples=len(paths),
        num_classes=len(class_names),
        read_records=read_records,
        parse=_identity,
        describe=lambda i: paths[i],
        tf_read=tf_read,
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
    with prepare.file_lock(root, f".{builder.name}.prepare.lock"):
        yield


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
            fresh = prepare.prepared_builder(builder)
            if fresh is not None:
                return fresh
            if "://" in root:  # TFDS cannot write ArrayRecord to a bucket: staged locally, then uploaded
                return prepare.prepare_to_bucket(prepare.builder_spec(builder), root, manual_dir)
            builder.download_and_prepare(download_config=config, file_format="array_record")
            return builder

    try:
        # In a run of several processes, process 0 prepares and the others wait for it (then
        # find it prepared): hosts sharing a gs:// data_dir, where no lock exists, would each
        # build it for hours and race on the final rename.
        return coordination.first_process_then_others(f"tfds_prepare/{name}/{root}", root, prepare_unless_prepared)
    except Exception as error:  # noqa: BLE001 - re-raised with what to do
        fresh = prepare.prepared_builder(builder)
        if fresh is not None:  # prepared meanwhile by a process that does not share this run
            return fresh
        raise FileNotFoundError(
            f"could not prepare TFDS dataset {name!r} in {builder.data_dir_root} ({error}). "
            f"Prepare it on a machine with network access: `tfds build {name} "
            f"--data_dir=DATA_DIR --file_format=array_record`, then pass data_dir=DATA_DIR."
        ) from error


# ArrayRecord reads a range of records through a read-ahead buffer, one request to a bucket per
# buffer's worth (measured on the Storage emulator); without one (TFDS's random-access setting),
# one request per record. 16 MB: a block of 64 ImageNet records (~7 MB) in one request.
RANGE_READ_OPTIONS = "readahead_buffer_size:16M,max_parallelism:1"


def record_runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Returns the runs [start, stop) of consecutive numbers that cover the distinct `indices`, in order."""
    runs: list[tuple[int, int]] = []
    for index in sorted(set(indices)):
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


class RunReader:
    """Reads runs of consecutive records of a TFDS split stored as ArrayRecord, each run with one
    ranged read per shard it spans (ArrayRecord's `read(start, stop)` with a read-ahead buffer),
    the runs of one call on a pool of threads. One reader per shard, opened on first use."""

    def __init__(self, file_instructions):
        self._files = [(str(f.filename), int(f.skip), int(f.take)) for f in file_instructions]
        self._starts = np.cumsum([0] + [take for _, _, take in self._files])
        self._readers: dict[int, Any] = {}

    def _reader(self, shard: int):
        if shard not in self._readers:  # a race opens a reader twice at worst: both work
            self._readers[shard] = array_record_module.ArrayRecordReader(
                self._files[shard][0], options=RANGE_READ_OPTIONS
            )
        return self._readers[shard]

    def read_run(self, start: int, stop: int) -> list[bytes]:
        """Returns records start .. stop - 1 (indices of the split)."""
        records: list[bytes] = []
        while start < stop:
            shard = int(np.searchsorted(self._starts, start, side="right")) - 1
            _, skip, _ = self._files[shard]
            end = min(stop, int(self._starts[shard + 1]))
            offset = skip + start - int(self._starts[shard])
            records += self._reader(shard).read(offset, offset + end - start)
            start = end
        return records

    def read(self, indices: Sequence[int], single: Callable[[list[int]], Sequence[bytes]]) -> list[bytes]:
        """Returns the records of `indices` (any order, repeats allowed): a request per run of two
        or more, the lone records by `single` (one call for all of them)."""
        runs = record_runs(indices)
        long_runs = [run for run in runs if run[1] - run[0] > 1]
        lone = [start for start, stop in runs if stop - start == 1]
        found = dict(zip(lone, single(lone))) if lone else {}
        for (start, _), records in zip(long_runs, _READERS.map(lambda run: self.read_run(*run), long_runs)):
            found.update(zip(range(start, start + len(records)), records))
        return [found[i] for i in indices]


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
    dataset = builder.as_dataset(split, decoders={image_key: tfds.decode.SkipDecoding()}, shuffle_files=False)
    images, labels = [], []
    for example in dataset.as_numpy_iterator():
        images.append(example[image_key])
        labels.append(int(example[label_key]) if label_key else -1)
    return ImageSource(
        name=f"{builder.name}:{split}",
        num_examples=len(images),
        num_classes=num_classes,
        read_records=lambda indices: (
            [images[i] for i in indices],
            [labels[i] for i in indices],
            [None] * len(indices),
        ),
        parse=_identity,
        describe=lambda i: f"example {i} of {builder.name}:{split}",
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
    prepared = prepare.prepared_builder(builder)  # not the builder itself: it may predate the preparation
    builder = _prepare(builder, manual_dir) if prepared is None else prepared
    base_split = split.split("[")[0]
    if base_split not in builder.info.splits:
        raise ValueError(
            f"TFDS dataset {name!r} has no split {split!r}: choose one of "
            f"{sorted(builder.info.splits)} (slices such as 'train[:10%]' work too)."
        )
    image_key, label_key, num_classes = _image_and_label_keys(builder)
    try:
        records = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except NotImplementedError:
        return _in_memory_source(builder, split, image_key, label_key, num_classes, max_in_memory_bytes)
    features = builder.info.features
    decoders = {image_key: tfds.decode.SkipDecoding()}

    def parse(record, _):
        example = features.deserialize_example(record, decoders=decoders)
        label = example[label_key] if label_key else tf.constant(-1, tf.int64)
        return example[image_key], label

    runs = RunReader(builder.info.splits[split].file_instructions)

    def read_records(indices):
        # Runs of consecutive records (blocks) by one ranged read each; lone records by one call,
        # which ArrayRecord reads in parallel (what matters on remote storage). A failed batch is
        # read again one record at a time, to find the culprits.
        batch, error = read_with_retries(lambda: runs.read(list(indices), records.__getitems__), f"{name}:{split}")
        if error is None:
            return list(batch), [-1] * len(indices), [None] * len(indices)
        results = [read_with_retries(lambda i=i: records[i], f"example {i} of {name}:{split}") for i in indices]
        return [r for r, _ in results], [-1] * len(indices), [e for _, e in results]

    return ImageSource(
        name=f"{name}:{split}",
        num_examples=len(records),
        num_classes=num_classes,
        read_records=read_records,
        parse=parse,
        describe=lambda i: f"example {i} of {name}:{split}",
        reads_runs=True,
    )


def open_source(dataset: str, split: str, **tfds_options) -> ImageSource:
    """Returns the random-access source of `dataset` ('folder:/path' or a TFDS name) and split;
    tfds_options (data_dir, manual_dir, max_in_memory_bytes) go to tfds_source."""
    if dataset.startswith(FOLDER_PREFIX):
        return folder_source(dataset[len(FOLDER_PREFIX) :], split)
    return tfds_source(dataset, split, **tfds_options)
