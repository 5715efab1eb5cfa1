"""The tf.data input pipelines: multi-crop pre-training batches and evaluation batches.

Positions. The stream of examples is indexed by a global position p = 0, 1, 2, ...: global
batch t holds positions [t G, (t + 1) G) for a global batch size G, and host h of P takes
the contiguous slice [t G + h G/P, t G + (h + 1) G/P). Position p is example
`index_shuffle(p mod N)` of epoch p // N, a stateless permutation of the N examples keyed
by (seed, epoch); its augmentations are drawn from seeds folded from (seed, p). So the
element at position p is a pure function of (seed, p): the same for any number of hosts or
parallel calls, each example is seen once per epoch across hosts, and starting at step k is a
seek (the iterator starts from position k G), not a replay.

Host work is geometry only. Per image: the crop boxes of all views are drawn from the image
size (read from the JPEG header without decoding), only the rectangle that holds them is
decoded (`decode_and_crop_jpeg`, the same pixels as decoding all and cropping), and each
view is cropped, resized and flipped by one compiled call per crop group (`resample.py`: the
bytes of Pillow's bicubic resize, as the release makes them). The colour chain's
random draws go with the uint8 views; `colour.augment_views` applies them on the
accelerator (`colour="device"`, the default), or `augment.colour_augment` on the host
(`colour="host"`, float32 normalised views, as evaluation tools and CPU users may want).

Reading. The records of a batch are read in one call (`ImageSource.read_records`: a pool of
threads for files, ArrayRecord's batched read for TFDS); transient read errors are retried
with backoff. An example that cannot be read or decoded is replaced by a random other example
(up to MAX_ATTEMPTS tries, drawn from (seed, p): batches stay fixed) and counted, read
failures apart from undecodable images. The iterator stops with `PipelineError` when more than
`max_failure_share` of the last `failure_window` images failed, or when every try of one
example failed, naming the first failing files. Evaluation never substitutes: a failed image
is masked.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import os
import threading
import weakref
from typing import Any, Callable, Iterator, Sequence

import tensorflow as tf
import tensorflow.experimental.numpy as tnp
from absl import logging

from vicregl_jax.data import augment, crops, resample, sources
from vicregl_jax.data.crops import CropGroup
from vicregl_jax.data.grids import location_grid

MAX_ATTEMPTS = 8  # tries per position: its example, then random substitutes
VAL_RESIZE, VAL_SIZE = 256, 224
# The release's linear evaluation (its evaluate.py) normalises with the usual red std 0.229,
# unlike its pre-training (0.228), and resizes bilinearly: the evaluation defaults follow it.
EVAL_STD = (0.229, 0.224, 0.225)
EVAL_INTERPOLATION = "bilinear"
# INTEGER_ACCURATE is libjpeg's default, hence PIL's: the same pixels as the release decodes.
JPEG_DCT_METHODS = ("INTEGER_ACCURATE", "INTEGER_FAST")
# "pillow": Pillow's resize, byte for byte, compiled (resample.py; runs in Python, so not on tf.data
# service workers); "tensorflow": tf.image.resize (float, antialiased: within a level of
# Pillow almost everywhere), TensorFlow ops only.
RESIZE_METHODS = ("pillow", "tensorflow")
COLOUR_MODES = ("device", "host", "none")
_JPEG_BLOCK = 16

# Salts that separate the random streams derived from one seed.
_SHUFFLE_SALT, _VIEW_SALT = 0x5EED, 0x71E35
_CROP, _FLIP, _COLOUR, _SUBSTITUTE = 1, 2, 3, 4
# A 1 x 1 black PNG: what a position whose tries all failed is made of (the iterator raises).
_PLACEHOLDER_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de000000"
    "0c49444154789c63606060000000040001f61738550000000049454e44ae426082"
)
_FAILURE_KEYS = ("read_failures", "decode_failures", "failed_index", "failed_read")


class PipelineError(RuntimeError):
    """The input pipeline cannot go on (too many unreadable or undecodable images)."""


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """Where a dataset is and how a host reads it; shared by all the iterators.

    process_index / process_count default to JAX's; num_threads to the CPUs this process may
    run on (its affinity mask, as SLURM and containers set it). max_failure_share of the last
    failure_window images may fail (unreadable or undecodable) before training stops.
    jpeg_dct_method "INTEGER_FAST" decodes a little faster, with pixels that differ from PIL's.
    resize "pillow" (default) resizes as Pillow does, byte for byte, compiled; "tensorflow" with
    TensorFlow's resize (what a tf.data service worker can run; 4-6x slower).
    """

    data_dir: str | None = None
    manual_dir: str | None = None
    process_index: int | None = None
    process_count: int | None = None
    num_threads: int | None = None
    prefetch: int = 2
    max_in_memory_bytes: int = sources.DEFAULT_MAX_IN_MEMORY_BYTES
    jpeg_dct_method: str = "INTEGER_ACCURATE"
    max_failure_share: float = 0.01
    failure_window: int = 10_000
    resize: str = "pillow"

    def __post_init__(self):
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize={self.resize!r}: use one of {RESIZE_METHODS}.")
        if self.jpeg_dct_method not in JPEG_DCT_METHODS:
            raise ValueError(f"jpeg_dct_method={self.jpeg_dct_method!r}: use one of {JPEG_DCT_METHODS}.")
        if not 0.0 <= self.max_failure_share <= 1.0:
            raise ValueError(f"max_failure_share={self.max_failure_share!r}: give a fraction in [0, 1], e.g. 0.01.")
        if self.failure_window <= 0:
            raise ValueError(f"failure_window={self.failure_window!r}: give a positive count, e.g. 10000.")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads={self.num_threads!r}: give a positive count or None (all usable CPUs).")

    @classmethod
    def from_config(cls, data_config) -> ReadOptions:
        """Returns the options of a run's config.data section (data_dir, manual_dir, num_threads,
        jpeg_dct_method, max_failure_share, failure_window, resize; absent keys keep their defaults)."""
        fields = ("data_dir", "manual_dir", "num_threads", "jpeg_dct_method", "max_failure_share", "failure_window",
                  "resize")
        return cls(**{f: data_config[f] for f in fields if f in data_config})

    def threads(self) -> int:
        """Returns the number of parallel calls: num_threads, else the CPUs usable by this process."""
        return self.num_threads or len(os.sched_getaffinity(0)) or 1


@dataclasses.dataclass(frozen=True)
class EvalImages:
    """How evaluation images are made: resize (short side resize_size), crop image_size,
    normalise. The defaults follow the release's linear evaluation; pass
    interpolation="bicubic", std=IMAGENET_STD to match its pre-training transforms."""

    image_size: int = VAL_SIZE
    resize_size: int = VAL_RESIZE
    interpolation: str = EVAL_INTERPOLATION
    mean: tuple = augment.IMAGENET_MEAN
    std: tuple = EVAL_STD

    def __post_init__(self):
        CropGroup(self.image_size, 1, (1.0, 1.0))  # validates image_size
        if self.interpolation not in resample.FILTERS:
            raise ValueError(f"interpolation={self.interpolation!r}: use one of {tuple(resample.FILTERS)} "
                             "(the release's filters).")
        if self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size={self.resize_size} is smaller than image_size={self.image_size}: the "
                f"centre crop must fit in the resized image: use resize_size >= {self.image_size} "
                "(e.g. 256 for 224)."
            )


# --------------------------------------------------------------------------------------------
# Decoding and geometry (TF graph, per image)
# --------------------------------------------------------------------------------------------


def decode_rgb(encoded: tf.Tensor, dct_method: str = "INTEGER_ACCURATE") -> tf.Tensor:
    """Returns the uint8 (H, W, 3) RGB image of encoded JPEG/PNG/GIF/BMP/WebP bytes.

    Grey images are replicated to RGB, alpha is dropped, CMYK JPEGs are converted, animated
    images give their first frame. JPEGs are decoded with `dct_method`.
    """
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=dct_method),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8),
    )
    return tf.ensure_shape(image, [None, None, 3])


def decode_covering(encoded: tf.Tensor, draw_boxes: Callable, dct_method: str, whole: bool = False):
    """Returns (boxes, region, region_top, region_left): the int32 (n, 4) crop boxes that
    `draw_boxes(height, width)` draws for the image, and the uint8 part of the image that holds
    them all, decoded alone for a JPEG (its size read from the header), with its offset.
    With `whole`, the region is the whole image."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        boxes = draw_boxes(shape[0], shape[1])
        if whole:
            top = left = tf.constant(0, tf.int32)
            bottom, right = shape[0], shape[1]
        else:
            top, left = tf.reduce_min(boxes[:, 0]), tf.reduce_min(boxes[:, 1])
            bottom = tf.reduce_max(boxes[:, 0] + boxes[:, 2])
            right = tf.reduce_max(boxes[:, 1] + boxes[:, 3])
        # libjpeg's cropped decoding upsamples chroma differently at the window's edges: a
        # margin of one 16-pixel block (the largest JPEG block) aligned to the block grid gives
        # exactly the pixels of a full decode (tests/test_data_colour.py), then we cut it off.
        margin = _JPEG_BLOCK
        top0 = tf.maximum(0, (top - margin) // margin * margin)
        left0 = tf.maximum(0, (left - margin) // margin * margin)
        bottom0 = tf.minimum(shape[0], -(-(bottom + margin) // margin) * margin)
        right0 = tf.minimum(shape[1], -(-(right + margin) // margin) * margin)
        window = tf.stack([top0, left0, bottom0 - top0, right0 - left0])
        region = tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method=dct_method)
        region = region[top - top0 : bottom - top0, left - left0 : right - left0]
        return boxes, tf.ensure_shape(region, [None, None, 3]), top, left

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
        image = tf.ensure_shape(image, [None, None, 3])
        shape = tf.shape(image)
        zero = tf.constant(0, tf.int32)
        return draw_boxes(shape[0], shape[1]), image, zero, zero

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def resize(image: tf.Tensor, size, method: str = "bicubic") -> tf.Tensor:
    """Returns the image resized to `size` (h, w) by TensorFlow with antialiasing, float32.

    Values are not rounded: bicubic overshoots [0, 255] near edges; PIL rounds and clips to
    uint8, which `to_uint8` does. Pillow also rounds between its two passes: `resize_views`
    and `centre_view` give Pillow's bytes with resize="pillow".
    """
    return tf.image.resize(image, size, method=method, antialias=True)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Returns a resized float image rounded and clipped to uint8, as PIL leaves it."""
    return tf.saturate_cast(tf.round(image), tf.uint8)


def example_index(position: tf.Tensor, num_examples: int, seed: int, shuffle: bool) -> tf.Tensor:
    """Returns the example at a global position: a permutation of the dataset per epoch."""
    if not shuffle:
        return position % num_examples
    epoch = position // num_examples
    key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, _SHUFFLE_SALT], tf.int64), epoch
    )
    return tf.random.experimental.index_shuffle(
        position % num_examples, key, tf.constant(num_examples - 1, tf.int64)
    )


def position_seed(position: tf.Tensor, seed: int) -> tf.Tensor:
    """Returns the stateless seed (2,) of all random draws for the example at `position`."""
    return tf.random.experimental.stateless_fold_in(
        tf.constant([seed, _VIEW_SALT], tf.int64), position
    )


def _fold(seed, salt):
    return tf.random.experimental.stateless_fold_in(seed, salt)


def resize_views(region, boxes, flips, size: int, method: str = "bicubic", impl: str = "pillow") -> tf.Tensor:
    """Returns the uint8 (V, size, size, 3) views region[top:top + h, left:left + w] (boxes (V, 4)
    int32 in region pixels) resized to size x size with `method` and mirrored where flips (V,).

    impl "pillow": one compiled call (`resample.crop_resize`, Pillow's bytes); "tensorflow":
    TensorFlow ops per view.
    """
    count = boxes.shape[0]
    if impl == "pillow":
        kind = resample.FILTERS[method]
        views = tf.numpy_function(lambda r, b, f: resample.crop_resize(r, b, f, size, kind),
                                  [region, boxes, flips], tf.uint8, stateful=False)
        return tf.ensure_shape(views, [count, size, size, 3])
    views = []
    for v in range(count):
        top, left, height, width = tf.unstack(boxes[v])
        view = to_uint8(resize(region[top : top + height, left : left + width], [size, size], method))
        # A cond, not tf.where: where would compute the reversed copy of every view.
        views.append(tf.cond(flips[v], lambda view=view: tf.reverse(view, axis=[1]), lambda view=view: view))
    return tf.stack(views)


def make_views(encoded, seed, groups, grid_sizes, flip_grid, dct_method, method="bicubic", whole=False,
               impl="pillow"):
    """Returns the views of one image for each crop group: uint8 (count, S, S, 3) flipped
    where drawn, grids (count, n, n, 2), colour draws, and the decoded region and offset.

    The draws of group k come from seeds folded from (seed, k): a group's views do not
    depend on the other groups.
    """
    group_seeds = [_fold(seed, k) for k in range(len(groups))]

    def draw_boxes(height, width):
        return tf.concat([
            crops.sample_crop_boxes(_fold(s, _CROP), height, width, g.count, g.scale)
            for g, s in zip(groups, group_seeds)
        ], axis=0)

    boxes, region, region_top, region_left = decode_covering(encoded, draw_boxes, dct_method, whole)
    out, first = [], 0
    for group, group_seed, n in zip(groups, group_seeds, grid_sizes):
        group_boxes = boxes[first : first + group.count]
        first += group.count
        flips = crops.sample_flips(_fold(group_seed, _FLIP), group.count)
        in_region = group_boxes - tf.stack([region_top, region_left, 0, 0])
        views = resize_views(region, in_region, flips, group.size, method, impl)
        grids = location_grid(*tf.unstack(tf.cast(group_boxes, tf.float64), axis=1), n,
                              flip=flips & flip_grid, xp=tnp)
        draws = augment.sample_colour_params(_fold(group_seed, _COLOUR), group.count)
        out.append((views, grids, draws))
    return out, region, region_top, region_left


def centre_view(image: tf.Tensor, size: int, resize_size: int, method: str = "bicubic", impl: str = "pillow"):
    """Returns the uint8 (size, size, 3) centre crop of the image resized to short side
    resize_size (with impl "pillow", only the crop's pixels are computed, as Pillow's)."""
    shape = crops.resized_shape(tf.shape(image)[0], tf.shape(image)[1], resize_size)
    offsets = crops.centre_crop_offsets(shape, size)
    if impl == "pillow":
        def window(image, shape, offsets):
            return resample.resize(image, shape[0], shape[1], method, window=(*offsets, size, size))

        view = tf.numpy_function(window, [image, shape, offsets], tf.uint8, stateful=False)
        return tf.ensure_shape(view, [size, size, 3])
    resized = to_uint8(resize(image, shape, method))
    top, left = tf.unstack(offsets)
    return resized[top : top + size, left : left + size]


# --------------------------------------------------------------------------------------------
# The stream of examples of one host
# --------------------------------------------------------------------------------------------


def host_positions(step: tf.Tensor, local_batch: int, global_batch: int, process_index: int) -> tf.Tensor:
    """Returns the int64 (local_batch,) global positions that one host reads at `step`."""
    return step * global_batch + process_index * local_batch + tf.range(local_batch, dtype=tf.int64)


def _substitute(position, seed: int, attempt, num_examples: int):
    """Returns the example tried at `attempt` >= 1 for a position: random, so that bad files
    that sit together in the dataset's order cannot exhaust the tries of one position."""
    draw = tf.random.stateless_uniform(
        [], _fold(_fold(position_seed(position, seed), _SUBSTITUTE), attempt),
        maxval=num_examples, dtype=tf.int64,
    )
    return draw


def _examples(source, steps: tf.data.Dataset, *, index_of: Callable, seed: int, attempts_of: Callable,
              process: Callable, local_batch: int, global_batch: int, process_index: int,
              parallel: int, python_reads: bool) -> tf.data.Dataset:
    """Returns the dataset of processed examples of the given steps, in order: per position,
    `process(encoded image, label, position)` of the first of its example and substitutes that reads
    and decodes, with the counts of failures met on the way (_FAILURE_KEYS).

    With python_reads, each step's records are read in one Python call (retries, read errors
    counted apart); without, by TensorFlow ops per example (all a tf.data service worker can
    run: a read error then counts as undecodable).
    """
    num = source.num_examples

    def read_step(step):
        positions = host_positions(step, local_batch, global_batch, process_index)
        indices = tf.map_fn(index_of, positions, fn_output_signature=tf.int64)
        if python_reads:
            records, labels, ok = source.read_tf(indices)
        else:
            records = tf.fill([local_batch], "")
            labels = tf.fill([local_batch], tf.constant(-1, tf.int64))
            ok = tf.ones([local_batch], tf.bool)
        return positions, indices, records, labels, ok

    def read_one(index):
        if python_reads:
            records, labels, ok = source.read_tf(index[None])
            return records[0], labels[0], ok[0]
        record, label = source.tf_read(index)
        return record, tf.cast(label, tf.int64), tf.constant(True)

    def example(position, index0, record0, label0, ok0):
        attempts = attempts_of(position)

        def attempt(a):
            index = tf.where(a == 0, index0, _substitute(position, seed, a, num))
            if python_reads:
                record, label, ok = tf.cond(a == 0, lambda: (record0, label0, ok0), lambda: read_one(index))
            else:
                record, label, ok = read_one(index)
            return a, record, label, ok

        def count_read_failures(before, element):
            a, record, label, ok = element
            return before + tf.cast(~ok, tf.int32), (a, record, label, ok, before)

        def decode(a, record, label, ok, read_failures):
            out = process(*source.parse(record, label), position)
            a = tf.cast(a, tf.int32)
            out.update(
                read_failures=read_failures, decode_failures=a - read_failures,
                failed_index=tf.where(a > 0, index0, -1), failed_read=(a > 0) & ~ok0,
            )
            return out

        def placeholder(_):
            out = process(tf.constant(_PLACEHOLDER_PNG), tf.constant(-1, tf.int64), position)
            out.update(read_failures=tf.constant(0), decode_failures=tf.cast(attempts, tf.int32),
                       failed_index=tf.where(attempts > 0, index0, -1), failed_read=~ok0)
            return out

        tried = tf.data.Dataset.range(tf.cast(attempts, tf.int64)).map(attempt)
        tried = tried.scan(tf.constant(0), count_read_failures).filter(lambda a, r, lab, ok, n: ok)
        tried = tried.map(decode).ignore_errors()
        return tried.concatenate(tf.data.Dataset.range(1).map(placeholder)).take(1)

    ds = steps.map(read_step, num_parallel_calls=2, deterministic=True).unbatch()
    return ds.interleave(example, cycle_length=parallel, block_length=1,
                         num_parallel_calls=parallel, deterministic=True)


def _max_attempts(position):
    return MAX_ATTEMPTS


def _options(num_threads: int) -> tf.data.Options:
    """Returns deterministic tf.data options on `num_threads` threads."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = num_threads
    options.threading.max_intra_op_parallelism = 1
    return options


def _resolve_hosts(global_batch_size: int, process_index, process_count) -> tuple[int, int, int]:
    """Returns (process_index, process_count, local batch size), checked; JAX's by default."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is outside [0, process_count={process_count}): "
            "pass the index of this host (jax.process_index())."
        )
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a positive multiple of "
            f"process_count={process_count}: choose a batch size that every host can share "
            f"equally (e.g. {max(1, global_batch_size // process_count) * process_count})."
        )
    return process_index, process_count, global_batch_size // process_count


def _open(dataset: str, split: str, read: ReadOptions) -> sources.ImageSource:
    return sources.open_source(dataset, split, data_dir=read.data_dir, manual_dir=read.manual_dir,
                               max_in_memory_bytes=read.max_in_memory_bytes)


# --------------------------------------------------------------------------------------------
# The Python iterator: failure accounting, clean shutdown
# --------------------------------------------------------------------------------------------

# Open iterators, closed before the interpreter shuts down: tf.data's iterator destructor
# waits for its Python (numpy_function) calls, which cannot run any more once finalisation
# has begun: the process would hang after an error instead of exiting.
_OPEN_ITERATORS: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()


@atexit.register
def _close_open_iterators():
    for iterator in list(_OPEN_ITERATORS):
        iterator.close()


class BatchIterator:
    """Python iterator over per-host batches (dicts of numpy arrays).

    Attributes: `step` (index of the next batch), `num_skipped` (images replaced or masked
    in the batches delivered so far), of which `num_unreadable` (read errors, after retries)
    and `num_undecodable`; `failed_examples` (the first few, by name); `num_examples` and
    `num_classes` of the dataset (0 classes when unlabelled), `steps` (batches it yields,
    None when endless; also `len()`), and `dataset`, the underlying tf.data.Dataset.
    `close()` (or leaving a `with` block) stops its threads.
    """

    MAX_NAMED_FAILURES = 5

    def __init__(self, dataset: tf.data.Dataset, start_step: int, source: sources.ImageSource,
                 steps: int | None = None, *, read: ReadOptions = ReadOptions(),
                 give_up: bool = True, process_index: int = 0, global_batch: int = 0,
                 reorder: bool = False):
        self.dataset = dataset
        self.step = start_step
        self.num_unreadable = self.num_undecodable = 0
        self.failed_examples: list[str] = []
        self.num_examples = source.num_examples
        self.num_classes = source.num_classes
        self.steps = steps
        self._source = source
        self._read = read
        self._give_up = give_up
        self._process_index = process_index
        self._global_batch = global_batch
        self._reorder = reorder
        self._waiting: dict[int, dict] = {}  # batches that arrived early (tf.data service)
        self._window: collections.deque = collections.deque()  # (images tried, failures) per batch
        self._window_tried = self._window_failed = 0
        self._lock = threading.Lock()
        self._iterator = iter(dataset.as_numpy_iterator())
        _OPEN_ITERATORS.add(self)

    @property
    def num_skipped(self) -> int:
        return self.num_unreadable + self.num_undecodable

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stops the pipeline's threads (waits for their calls in flight)."""
        with self._lock:
            self._iterator = None
        _OPEN_ITERATORS.discard(self)

    def _next_raw(self) -> dict:
        if self._iterator is None:
            raise StopIteration
        if not self._reorder:
            return next(self._iterator)
        # The tf.data service delivers whole batches in any order: put them back in step order.
        while self.step not in self._waiting:
            batch = next(self._iterator)
            step = int(batch["position"][0]) // self._global_batch
            self._waiting[step] = batch
            if len(self._waiting) > 64:
                raise PipelineError(
                    f"batch {self.step} never came from the tf.data service while "
                    f"{len(self._waiting)} later ones did (a worker lost?): restart the run, "
                    "which resumes from its last checkpoint.")
        return self._waiting.pop(self.step)

    def __next__(self) -> dict[str, Any]:
        try:
            batch = self._next_raw()
            self._account(batch)
        except StopIteration:
            self.close()
            raise
        except BaseException:
            # Stop the threads now, while they can still finish their Python calls.
            self.close()
            raise
        batch.pop("position", None)
        self.step += 1
        return batch

    def _account(self, batch: dict) -> None:
        """Counts the failures of a batch, names the first ones, and applies the give-up rule."""
        read_failures, decode_failures = batch.pop("read_failures"), batch.pop("decode_failures")
        failed_index, failed_read = batch.pop("failed_index"), batch.pop("failed_read")
        unreadable, undecodable = int(read_failures.sum()), int(decode_failures.sum())
        failures = unreadable + undecodable
        self.num_unreadable += unreadable
        self.num_undecodable += undecodable
        if failures:
            for index, was_read in zip(failed_index, failed_read):
                if index >= 0 and len(self.failed_examples) < self.MAX_NAMED_FAILURES:
                    kind = "unreadable" if was_read else "undecodable"
                    self.failed_examples.append(f"{self._source.describe(int(index))} ({kind})")
            logging.log_every_n_seconds(
                logging.WARNING, "Host %d: %d unreadable and %d undecodable images skipped so far "
                "in %s (first: %s).", 30, self._process_index, self.num_unreadable,
                self.num_undecodable, self._source.name, ", ".join(self.failed_examples))
        if not self._give_up:
            return
        exhausted = (read_failures + decode_failures) >= MAX_ATTEMPTS
        if exhausted.any():
            raise PipelineError(
                f"all {MAX_ATTEMPTS} images tried for one example of {self._source.name} failed "
                f"to decode or to read (e.g. {', '.join(self.failed_examples)}): is the dataset "
                "corrupt, not images, or its storage unreachable?")
        self._window.append((len(read_failures) + failures, failures))
        self._window_tried += len(read_failures) + failures
        self._window_failed += failures
        window = self._read.failure_window
        while self._window and self._window_tried - self._window[0][0] >= window:
            tried, failed = self._window.popleft()
            self._window_tried -= tried
            self._window_failed -= failed
        limit = self._read.max_failure_share * window
        if self._window_failed > limit:
            raise PipelineError(
                f"{self._window_failed} of the last {min(self._window_tried, window)} images of "
                f"{self._source.name} could not be used ({self.num_unreadable} unreadable and "
                f"{self.num_undecodable} undecodable so far on host {self._process_index}), more than "
                f"max_failure_share={self._read.max_failure_share} of {window}: first failing: "
                f"{', '.join(self.failed_examples)}. Remove or repair these files, or raise "
                "max_failure_share.")

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("this iterator is endless: it has no len()")
        return self.steps

    def stats(self) -> dict[str, int]:
        """Returns the step, the counts of skipped images (all, unreadable, undecodable) and
        the dataset size."""
        return {
            "step": self.step,
            "num_skipped": self.num_skipped,
            "num_unreadable": self.num_unreadable,
            "num_undecodable": self.num_undecodable,
            "num_examples": self.num_examples,
        }


# --------------------------------------------------------------------------------------------
# The iterators
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _host_colour_chain():
    """Returns augment.colour_augment compiled by XLA (once per view shape and process)."""
    return tf.function(lambda views, draws: augment.colour_augment(
        views, tf.zeros(tf.shape(views)[:2], tf.bool), draws), jit_compile=True)


def _shuffled_batches(source, start_step: int, seed: int, process: Callable, finish_batch: Callable, *,
                      local_batch: int, global_batch: int, process_index: int, read: ReadOptions,
                      python_reads: bool) -> tf.data.Dataset:
    """Returns this process's batches of steps start_step, start_step + 1, ...: the examples of
    each step drawn from a shuffled epoch order of (seed, step), processed, batched and finished
    (finish_batch on the whole batch), without the final prefetch."""
    parallel = read.threads()
    ds = _examples(
        source, tf.data.Dataset.counter(start_step), seed=seed,
        index_of=functools.partial(example_index, num_examples=source.num_examples, seed=seed, shuffle=True),
        attempts_of=_max_attempts, process=process, local_batch=local_batch,
        global_batch=global_batch, process_index=process_index, parallel=parallel,
        python_reads=python_reads,
    )
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(finish_batch, num_parallel_calls=2, deterministic=True)
    return ds.with_options(_options(parallel))


def make_pretrain_iterator(
    dataset: str,
    split: str,
    *,
    groups: Sequence[CropGroup],
    global_batch_size: int,
    seed: int,
    stride: int = 32,
    flip_grid: bool = False,
    with_labels: bool = True,
    with_val_view: bool = False,
    colour: str = "device",
    start_step: int = 0,
    read: ReadOptions = ReadOptions(),
    service: str | None = None,
) -> BatchIterator:
    """Returns an endless iterator of this host's pre-training batches.

    Each batch is a dict of numpy arrays, B = global_batch_size // process_count; per crop
    group (tuples in the order of `groups`):
      "views": uint8 (B, count, S, S, 3), cropped, resized and flipped;
      "draws": dicts of the colour draws (B, count) ("order": (B, count, 4)) that
               `colour.augment_views` applies on the accelerator;
      "grids": float32 (B, count, n, n, 2), (row, col) in the original image's pixels,
               n = S // stride;
    and "label": int32 (B,), -1 when the dataset has no labels or with_labels=False;
    "val_image": float32 (B, 224, 224, 3) (resize 256, centre crop), with with_val_view.
    colour="host" applies the colour chain on the host instead ("views" float32 normalised,
    no "draws"); colour="none" only normalises. The batches from step k on are the same
    whether the iterator started at 0 or at start_step=k. `service`: the address of a
    tf.data service dispatcher (`python -m vicregl_jax.data.service`) that makes the batches
    on its workers; folder datasets only, with read.resize="tensorflow".
    """
    groups = tuple(groups)
    if not groups:
        raise ValueError(
            "groups is empty: give at least one CropGroup, e.g. CropGroup(224, 2, (0.08, 1.0))."
        )
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour={colour!r}: use one of {COLOUR_MODES} (device: draws with uint8 views).")
    grid_sizes = [crops.grid_size(g, stride) for g in groups]
    if start_step < 0:
        raise ValueError(f"start_step={start_step} is negative: give the index of the next step.")
    process_index, process_count, local_batch = _resolve_hosts(
        global_batch_size, read.process_index, read.process_count
    )
    source = _open(dataset, split, read)
    if service and source.tf_read is None:
        raise ValueError(
            f"service={service!r}: the tf.data service reads with TensorFlow ops only, and "
            f"{source.name} is read in Python; use a folder dataset ('folder:/path') with the service.")
    if service and read.resize != "tensorflow":
        raise ValueError(
            f"service={service!r} with resize={read.resize!r}: the tf.data service's workers run TensorFlow "
            "ops only, and the Pillow resize is compiled Python; set resize='tensorflow' "
            "(--config.data.resize=tensorflow) with the service.")

    def process(encoded, label, position):
        per_group, region, top, left = make_views(
            encoded, position_seed(position, seed), groups, grid_sizes, flip_grid,
            read.jpeg_dct_method, whole=with_val_view, impl=read.resize)
        out = {
            "position": position,
            "views": tuple(g[0] for g in per_group),
            "grids": tuple(g[1] for g in per_group),
            "draws": tuple(g[2] for g in per_group),
            "label": tf.cast(label, tf.int32) if with_labels else tf.constant(-1, tf.int32),
        }
        if with_val_view:
            out["val_image"] = centre_view(region, VAL_SIZE, VAL_RESIZE, impl=read.resize)
        return out

    def finish_batch(batch):
        if colour == "host":
            chain = _host_colour_chain()
            batch["views"] = tuple(chain(v, d) for v, d in zip(batch["views"], batch["draws"]))
        elif colour == "none":
            batch["views"] = tuple(augment.normalise(tf.cast(v, tf.float32) / 255.0) for v in batch["views"])
        if colour != "device":
            del batch["draws"]
        if with_val_view:
            batch["val_image"] = augment.normalise(tf.cast(batch["val_image"], tf.float32) / 255.0)
        return batch

    ds = _shuffled_batches(source, start_step, seed, process, finish_batch, local_batch=local_batch,
                           global_batch=global_batch_size, process_index=process_index, read=read,
                           python_reads=not service)
    if service:
        ds = ds.apply(tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=service))
    ds = ds.prefetch(read.prefetch)
    return BatchIterator(ds, start_step, source, read=read, process_index=process_index,
                         global_batch=global_batch_size, reorder=bool(service))


def make_eval_iterator(
    dataset: str,
    split: str,
    *,
    global_batch_size: int,
    images: EvalImages = EvalImages(),
    start_step: int = 0,
    read: ReadOptions = ReadOptions(),
) -> BatchIterator:
    """Returns an iterator over one pass of this host's evaluation batches, in dataset order.

    Each batch: {"image": float32 (B, S, S, 3) normalised, "label": int32 (B,), "mask": bool
    (B,)}, B = global_batch_size // process_count, S = images.image_size: each image resized
    (short side images.resize_size) and centre-cropped. The last batches are padded (mask
    False, label -1) so that every host yields the same number of batches; undecodable or
    unreadable images are masked too (and counted). `len()` gives the number of batches left
    (start_step skips batches of the pass).
    """
    process_index, process_count, local_batch = _resolve_hosts(
        global_batch_size, read.process_index, read.process_count
    )
    source = _open(dataset, split, read)
    num = source.num_examples
    steps = -(-num // global_batch_size)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} is outside the {steps} batches of one pass.")

    def process(encoded, label, position):
        view = centre_view(decode_rgb(encoded, read.jpeg_dct_method), images.image_size,
                           images.resize_size, images.interpolation, read.resize)
        return {"image": view, "label": tf.cast(label, tf.int32), "position": position}

    def finish_batch(batch):
        # Padding positions try no example (no failure); a failed image is masked, not replaced.
        failed = batch["read_failures"] + batch["decode_failures"] > 0
        valid = (batch["position"] < num) & ~failed
        batch["mask"] = valid
        batch["label"] = tf.where(valid, batch["label"], -1)
        batch["image"] = augment.normalise(tf.cast(batch["image"], tf.float32) / 255.0, images.mean, images.std)
        return batch

    parallel = read.threads()
    # The pass's positions, clipped into the dataset; padding positions try no example.
    def index_of(position):
        return tf.minimum(position, num - 1)

    def attempts_of(position):
        return tf.where(position < num, 1, 0)

    ds = _examples(
        source, tf.data.Dataset.range(start_step, steps), seed=0, index_of=index_of,
        attempts_of=attempts_of, process=process, local_batch=local_batch, global_batch=global_batch_size,
        process_index=process_index, parallel=parallel, python_reads=True,
    )
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(finish_batch, num_parallel_calls=2, deterministic=True)
    ds = ds.with_options(_options(parallel)).prefetch(read.prefetch)
    return BatchIterator(ds, start_step, source, steps - start_step, read=read, give_up=False,
                         process_index=process_index, global_batch=global_batch_size)


def make_linear_train_iterator(
    dataset: str,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    images: EvalImages = EvalImages(),
    scale: tuple[float, float] = (0.08, 1.0),
    start_step: int = 0,
    read: ReadOptions = ReadOptions(),
) -> BatchIterator:
    """Returns an endless iterator of this host's augmented batches for training a linear head.

    Batches as `make_eval_iterator`'s (mask always True): reshuffled per epoch, each image a
    random resized crop (`scale` of the area, resized with images.interpolation to
    images.image_size) flipped with p = 0.5, as the release's linear protocol trains;
    start_step resumes as in pre-training, and failures are handled as in pre-training.
    """
    group = CropGroup(images.image_size, 1, scale)  # validates scale
    process_index, process_count, local_batch = _resolve_hosts(
        global_batch_size, read.process_index, read.process_count
    )
    if start_step < 0:
        raise ValueError(f"start_step={start_step} is negative: give the index of the next step.")
    source = _open(dataset, split, read)

    def process(encoded, label, position):
        per_group, *_ = make_views(encoded, position_seed(position, seed), (group,), (1,), False,
                                   read.jpeg_dct_method, images.interpolation, impl=read.resize)
        return {"image": per_group[0][0][0], "label": tf.cast(label, tf.int32),
                "mask": tf.constant(True), "position": position}

    def finish_batch(batch):
        batch["image"] = augment.normalise(tf.cast(batch["image"], tf.float32) / 255.0, images.mean, images.std)
        return batch

    ds = _shuffled_batches(source, start_step, seed, process, finish_batch, local_batch=local_batch,
                           global_batch=global_batch_size, process_index=process_index, read=read,
                           python_reads=True).prefetch(read.prefetch)
    return BatchIterator(ds, start_step, source, read=read, process_index=process_index,
                         global_batch=global_batch_size)
