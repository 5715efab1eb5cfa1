"""The tf.data input pipelines: multi-crop pre-training batches and evaluation batches.

Positions. The stream of examples is indexed by a global position p = 0, 1, 2, ...: global
batch t holds positions [t G, (t + 1) G) for a global batch size G, and host h of P takes
the contiguous slice [t G + h G/P, t G + (h + 1) G/P). Position p is example
`index_shuffle(p mod N)` of epoch p // N, a stateless permutation of the N examples keyed
by (seed, epoch); its augmentations are drawn from seeds folded from (seed, p). So the
element at position p is a pure function of (seed, p): the same for any number of hosts or
parallel calls, each example is seen once per epoch across hosts, and starting at step k is a
seek (the iterator starts from position k G), not a replay.

Decode failures. An example whose bytes do not decode is skipped: position p then takes the
next example of the dataset (index + 1, + 2, ... up to MAX_DECODE_ATTEMPTS), which keeps
positions and batches fixed. Each skip is counted; `iterator.num_skipped` reports the count
of the batches delivered so far. Evaluation never substitutes: a failed image is masked.

Cost per image (see benchmarks/pipeline_bench.py): decode once, then per view a crop and a
bicubic antialiased resize (TensorFlow), and the colour chain compiled by XLA per crop group.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Sequence

import tensorflow as tf

from vicregl_jax.data import augment, crops, sources
from vicregl_jax.data.crops import CropGroup

MAX_DECODE_ATTEMPTS = 8
VAL_RESIZE, VAL_SIZE = 256, 224
# The release's linear evaluation (its evaluate.py) normalises with the usual red std 0.229,
# unlike its pre-training (0.228), and resizes bilinearly: the evaluation defaults follow it.
EVAL_STD = (0.229, 0.224, 0.225)
EVAL_INTERPOLATION = "bilinear"

# Salts that separate the random streams derived from one seed.
_SHUFFLE_SALT, _VIEW_SALT = 0x5EED, 0x71E35
_CROP, _FLIP, _COLOUR = 1, 2, 3


@functools.lru_cache(maxsize=None)
def _colour_chain(enabled: bool):
    """Returns colour_augment compiled by XLA (once per view shape and process)."""

    def chain(views, flips, params):
        return augment.colour_augment(views, flips, params, enabled=enabled)

    return tf.function(chain, jit_compile=True)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """Returns the uint8 (H, W, 3) RGB image of encoded JPEG/PNG/GIF/BMP/WebP bytes.

    Grey images are replicated to RGB, alpha is dropped, CMYK JPEGs are converted, animated
    images give their first frame.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    return tf.ensure_shape(image, [None, None, 3])


def resize(image: tf.Tensor, size, method: str = "bicubic") -> tf.Tensor:
    """Returns the image resized to `size` (h, w) with antialiasing, as PIL does, float32.

    Values are not rounded: bicubic overshoots [0, 255] near edges; PIL rounds and clips to
    uint8, which `to_uint8` does.
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


def host_positions(
    start_step: int, local_batch: int, global_batch: int, process_index: int
) -> tf.data.Dataset:
    """Returns the endless dataset of the global positions that one host reads, in order."""
    def to_global(local):
        step, slot = local // local_batch, local % local_batch
        return step * global_batch + process_index * local_batch + slot

    return tf.data.Dataset.counter(start_step * local_batch, dtype=tf.int64).map(to_global)


def _read_example(source: sources.ImageSource, index, attempts) -> tf.data.Dataset:
    """Returns a one-element dataset: the first decodable of examples index, index + 1, ...

    The element is (failures, image, label) where failures counts the undecodable examples
    passed over; when all `attempts` fail, failures == attempts and the image is 1 x 1 black.
    """
    num = source.num_examples

    def attempt(a):
        encoded, label = source.fetch((index + a) % num)
        return tf.cast(a, tf.int32), decode_rgb(encoded), label

    tried = tf.data.Dataset.range(tf.cast(attempts, tf.int64)).map(attempt).ignore_errors()
    failed = tf.data.Dataset.from_tensors(
        (tf.cast(attempts, tf.int32), tf.zeros([1, 1, 3], tf.uint8), tf.constant(-1, tf.int32))
    )
    return tried.concatenate(failed).take(1)


def _read_examples(dataset: tf.data.Dataset, read, parallel: int) -> tf.data.Dataset:
    """Maps each element to its decoded example, `parallel` at a time, in order."""
    return dataset.interleave(
        read, cycle_length=parallel, block_length=1, num_parallel_calls=parallel, deterministic=True
    )


def _shuffled_examples(
    source, seed, start_step, local_batch, global_batch, process_index, parallel
):
    """Returns the endless dataset of (position, failures, image, label) that one host reads:
    each epoch a fresh permutation, undecodable examples replaced by the next ones."""
    num = source.num_examples

    def read(position):
        index = example_index(position, num, seed, shuffle=True)
        return _read_example(source, index, MAX_DECODE_ATTEMPTS).map(
            lambda failures, image, label: (position, failures, image, label)
        )

    def check(position, failures, image, label):
        tf.debugging.assert_less(
            failures, MAX_DECODE_ATTEMPTS,
            message=f"{MAX_DECODE_ATTEMPTS} images in a row of {source.name} failed to decode: "
            "is the dataset corrupt, or not images?",
        )
        return position, failures, image, label

    positions = host_positions(start_step, local_batch, global_batch, process_index)
    return _read_examples(positions, read, parallel).map(check)


def _batches(ds, process, finish_batch, local_batch, prefetch, num_threads) -> tf.data.Dataset:
    """Returns ds mapped per example by `process`, batched, mapped per batch by `finish_batch`."""
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(finish_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(prefetch).with_options(_options(num_threads))


def make_views(
    image: tf.Tensor,
    seed: tf.Tensor,
    group: CropGroup,
    group_index: int,
    grid_size: int,
    flip_grid: bool,
    method: str = "bicubic",
):
    """Returns the resized views (count, S, S, 3), float32 not yet rounded nor flipped (the
    batched colour chain does both), their location grids (count, n, n, 2), flips (count,)
    and colour parameters, for one crop group of one image."""
    group_seed = tf.random.experimental.stateless_fold_in(seed, group_index)
    fold = lambda salt: tf.random.experimental.stateless_fold_in(group_seed, salt)  # noqa: E731
    shape = tf.shape(image)
    boxes = crops.sample_crop_boxes(fold(_CROP), shape[0], shape[1], group.count, group.scale)
    flips = crops.sample_flips(fold(_FLIP), group.count)
    views = []
    for v in range(group.count):
        top, left, height, width = tf.unstack(boxes[v])
        crop = image[top : top + height, left : left + width]
        views.append(resize(crop, [group.size, group.size], method))
    grids = crops.location_grid_tf(boxes, flips & flip_grid, grid_size)
    params = augment.sample_colour_params(fold(_COLOUR), group.count)
    return tf.stack(views), grids, flips, params


def centre_view(image: tf.Tensor, size: int, resize_size: int, method: str = "bicubic"):
    """Returns the uint8 (size, size, 3) centre crop of the image resized to short side
    resize_size."""
    shape = crops.resized_shape(tf.shape(image)[0], tf.shape(image)[1], resize_size)
    resized = to_uint8(resize(image, shape, method))
    top, left = tf.unstack(crops.centre_crop_offsets(shape, size))
    return resized[top : top + size, left : left + size]


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


def _options(num_threads: int | None) -> tf.data.Options:
    """Returns deterministic tf.data options, on `num_threads` threads if given."""
    options = tf.data.Options()
    options.deterministic = True
    if num_threads:
        options.threading.private_threadpool_size = num_threads
        options.threading.max_intra_op_parallelism = 1
    return options


class BatchIterator:
    """Python iterator over per-host batches (dicts of numpy arrays).

    Attributes: `step` (index of the next batch), `num_skipped` (undecodable images met in
    the batches delivered so far), `num_examples` and `num_classes` of the dataset (0 classes
    when unlabelled), `steps` (batches it yields, None when endless; also `len()`), and
    `dataset`, the underlying tf.data.Dataset.
    """

    def __init__(self, dataset: tf.data.Dataset, start_step: int, source: sources.ImageSource,
                 steps: int | None = None):
        self.dataset = dataset
        self.step = start_step
        self.num_skipped = 0
        self.num_examples = source.num_examples
        self.num_classes = source.num_classes
        self.steps = steps
        self._iterator = dataset.as_numpy_iterator()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iterator)
        self.num_skipped += int(batch.pop("failures").sum())
        self.step += 1
        return batch

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("this iterator is endless: it has no len()")
        return self.steps

    def stats(self) -> dict[str, int]:
        """Returns the step, the count of skipped undecodable images and the dataset size."""
        return {
            "step": self.step,
            "num_skipped": self.num_skipped,
            "num_examples": self.num_examples,
        }


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
    data_dir: str | None = None,
    manual_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    augment_colour: bool = True,
    num_threads: int | None = None,
    prefetch: int = 2,
    max_in_memory_bytes: int = sources.DEFAULT_MAX_IN_MEMORY_BYTES,
) -> BatchIterator:
    """Returns an endless iterator of this host's pre-training batches.

    Each batch is a dict of numpy arrays, B = global_batch_size // process_count:
      "views": tuple over groups of float32 (B, count, S, S, 3), normalised;
      "grids": tuple over groups of float32 (B, count, n, n, 2), (row, col) in the original
               image's pixels, n = S // stride;
      "label": int32 (B,), -1 when the dataset has no labels or with_labels=False;
      "val_image": float32 (B, 224, 224, 3) (resize 256, centre crop), with with_val_view.
    The batches from step k on are the same whether the iterator started at 0 or at
    start_step=k. `augment_colour=False` leaves out the colour ops (geometry only).
    `num_threads` bounds the threads of tf.data (default: all cores). Undecodable images
    are replaced by the next example and counted in `iterator.num_skipped`.
    """
    groups = tuple(groups)
    if not groups:
        raise ValueError(
            "groups is empty: give at least one CropGroup, e.g. CropGroup(224, 2, (0.08, 1.0))."
        )
    grid_sizes = [crops.grid_size(g, stride) for g in groups]
    if start_step < 0:
        raise ValueError(f"start_step={start_step} is negative: give the index of the next step.")
    process_index, process_count, local_batch = _resolve_hosts(
        global_batch_size, process_index, process_count
    )
    source = sources.open_source(
        dataset, split, data_dir=data_dir, manual_dir=manual_dir,
        max_in_memory_bytes=max_in_memory_bytes,
    )
    colour = _colour_chain(augment_colour)
    parallel = num_threads or os.cpu_count() or 1

    def process(position, failures, image, label):
        seed_p = position_seed(position, seed)
        views = [
            make_views(image, seed_p, group, k, n, flip_grid)
            for k, (group, n) in enumerate(zip(groups, grid_sizes))
        ]
        out = {
            "views": tuple(v[0] for v in views),
            "grids": tuple(v[1] for v in views),
            "flips": tuple(v[2] for v in views),
            "params": tuple(v[3] for v in views),
            "label": label if with_labels else tf.constant(-1, tf.int32),
            "failures": failures,
        }
        if with_val_view:
            out["val_image"] = centre_view(image, VAL_SIZE, VAL_RESIZE)
        return out

    def finish_batch(batch):
        # The per-pixel colour work runs once per batch, XLA-compiled: it writes the float32
        # views once, instead of per image and then again when batching.
        flips, params = batch.pop("flips"), batch.pop("params")
        batch["views"] = tuple(colour(*args) for args in zip(batch["views"], flips, params))
        if with_val_view:
            batch["val_image"] = augment.normalise(tf.cast(batch["val_image"], tf.float32) / 255.0)
        return batch

    ds = _shuffled_examples(
        source, seed, start_step, local_batch, global_batch_size, process_index, parallel
    )
    ds = _batches(ds, process, finish_batch, local_batch, prefetch, num_threads)
    return BatchIterator(ds, start_step, source)


def make_eval_iterator(
    dataset: str,
    split: str,
    *,
    global_batch_size: int,
    image_size: int = 224,
    resize_size: int = 256,
    train_augment: bool = False,
    scale: tuple[float, float] = (0.08, 1.0),
    seed: int = 0,
    start_step: int = 0,
    interpolation: str = EVAL_INTERPOLATION,
    mean: Sequence[float] = augment.IMAGENET_MEAN,
    std: Sequence[float] = EVAL_STD,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    prefetch: int = 2,
    max_in_memory_bytes: int = sources.DEFAULT_MAX_IN_MEMORY_BYTES,
) -> BatchIterator:
    """Returns an iterator of this host's evaluation batches.

    Each batch: {"image": float32 (B, S, S, 3) normalised, "label": int32 (B,), "mask": bool
    (B,)}, B = global_batch_size // process_count, S = image_size.
    Default: one pass in dataset order, each image resized (short side resize_size) and
    centre-cropped; the last batches are padded (mask False, label -1) so that every host
    yields the same number of batches, and undecodable images are masked too; `len()` gives
    the number of batches left (start_step skips batches of the pass). With
    train_augment=True: endless, reshuffled per epoch, a random resized crop (scale) and a
    horizontal flip per image, as the linear protocol trains; start_step resumes as in
    pre-training. The defaults resize bilinearly and normalise with std EVAL_STD, as the
    release's linear evaluation does; pass interpolation="bicubic", std=IMAGENET_STD to match
    its pre-training transforms instead.
    """
    group = CropGroup(image_size, 1, scale)  # validates image_size and scale
    if resize_size < image_size:
        raise ValueError(
            f"resize_size={resize_size} is smaller than image_size={image_size}: the centre "
            f"crop must fit in the resized image: use resize_size >= {image_size} "
            "(e.g. 256 for 224)."
        )
    process_index, process_count, local_batch = _resolve_hosts(
        global_batch_size, process_index, process_count
    )
    source = sources.open_source(
        dataset, split, data_dir=data_dir, manual_dir=manual_dir,
        max_in_memory_bytes=max_in_memory_bytes,
    )
    num = source.num_examples
    parallel = num_threads or os.cpu_count() or 1

    def finish_batch(batch):
        batch["image"] = augment.normalise(tf.cast(batch["image"], tf.float32) / 255.0, mean, std)
        return batch

    if train_augment:
        steps = None

        def process(position, failures, image, label):
            view, _, flips, _ = make_views(
                image, position_seed(position, seed), group, 0, 1, False, interpolation
            )
            view = to_uint8(tf.where(flips[0], tf.reverse(view[0], axis=[1]), view[0]))
            return {"image": view, "label": label, "mask": tf.constant(True), "failures": failures}

        ds = _shuffled_examples(
            source, seed, start_step, local_batch, global_batch_size, process_index, parallel
        )
    else:
        steps = -(-num // global_batch_size)
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step={start_step} is outside the {steps} batches of one pass.")

        def read(position):
            valid = position < num
            # Padding positions try no example: they give the 1 x 1 placeholder, failures 0.
            attempts = tf.where(valid, 1, 0)
            return _read_example(source, tf.minimum(position, num - 1), attempts).map(
                lambda failures, image, label: (valid & (failures == 0), failures, image, label)
            )

        def process(mask, failures, image, label):
            view = centre_view(image, image_size, resize_size, interpolation)
            label = tf.where(mask, label, -1)
            return {"image": view, "label": label, "mask": mask, "failures": failures}

        positions = host_positions(start_step, local_batch, global_batch_size, process_index)
        positions = positions.take((steps - start_step) * local_batch)
        ds = _read_examples(positions, read, parallel)
    ds = _batches(ds, process, finish_batch, local_batch, prefetch, num_threads)
    return BatchIterator(ds, start_step, source, None if steps is None else steps - start_step)
