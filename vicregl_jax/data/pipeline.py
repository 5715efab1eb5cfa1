"""The image iterators: multi-crop pre-training batches, evaluation batches and augmented batches
for a linear head, each the shared position stream (`stream.py`, `iterator.py`) with its own
per-example processing (`views.py`, `images.py`) and batch finishing.

    it = make_pretrain_iterator("vicregl_photos", "train", groups=[CropGroup(224, 2, (0.08, 1.0))],
                                global_batch_size=32, seed=0)
    batch = next(it)  # this host's rows of global batch it.step - 1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tensorflow as tf

from vicregl_jax.data import augment, crops, resample, stream, views
from vicregl_jax.data.crops import CropGroup
from vicregl_jax.data.images import (  # noqa: F401  (re-exported: the per-image ops)
    centre_view,
    decode_covering,
    decode_rgb,
    resize,
    to_uint8,
)
from vicregl_jax.data.iterator import BatchIterator, PipelineError, endless_iterator  # noqa: F401  (re-exported)
from vicregl_jax.data.options import JPEG_DCT_METHODS, RESIZE_METHODS, ReadOptions, resolve_hosts  # noqa: F401
from vicregl_jax.data.stream import MAX_ATTEMPTS, StreamKeys  # noqa: F401  (re-exported)
from vicregl_jax.data.views import example_index, position_seed  # noqa: F401  (re-exported)

VAL_RESIZE, VAL_SIZE = 256, 224
# The release's linear evaluation (its evaluate.py) normalises with the usual red std 0.229,
# unlike its pre-training (0.228), and resizes bilinearly: the evaluation defaults follow it.
EVAL_STD = (0.229, 0.224, 0.225)
EVAL_INTERPOLATION = "bilinear"
COLOUR_MODES = ("device", "none")


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
            raise ValueError(
                f"interpolation={self.interpolation!r}: use one of {tuple(resample.FILTERS)} (the release's filters)."
            )
        if self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size={self.resize_size} is smaller than image_size={self.image_size}: the "
                f"centre crop must fit in the resized image: use resize_size >= {self.image_size} "
                "(e.g. 256 for 224)."
            )

    def normalise(self, images: tf.Tensor) -> tf.Tensor:
        """Returns uint8 images as float32, normalised with these mean and std."""
        return augment.normalise(tf.cast(images, tf.float32) / 255.0, self.mean, self.std)


def _check_start_step(start_step: int) -> None:
    if start_step < 0:
        raise ValueError(f"start_step={start_step} is negative: give the index of the next step.")


def _check_service(service: str, source, read: ReadOptions) -> None:
    """Raises ValueError when the tf.data service cannot make this dataset's batches."""
    if source.tf_read is None:
        raise ValueError(
            f"service={service!r}: the tf.data service reads with TensorFlow ops only, and "
            f"{source.name} is read in Python; use a folder dataset ('folder:/path') with the service."
        )
    if read.resize != "tensorflow":
        raise ValueError(
            f"service={service!r} with resize={read.resize!r}: the tf.data service's workers run TensorFlow "
            "ops only, and the Pillow resize is compiled Python; set resize='tensorflow' "
            "(--config.data.resize=tensorflow) with the service."
        )


def _check_pretrain_args(groups: tuple[CropGroup, ...], colour: str) -> None:
    """Raises ValueError when there are no crop groups or colour is not one of COLOUR_MODES."""
    if not groups:
        raise ValueError("groups is empty: give at least one CropGroup, e.g. CropGroup(224, 2, (0.08, 1.0)).")
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour={colour!r}: use one of {COLOUR_MODES} (device: draws with uint8 views).")


def _distribute(ds: tf.data.Dataset, service: str) -> tf.data.Dataset:
    """Returns ds made by the workers of the tf.data service dispatcher at `service` (dynamic sharding)."""
    return ds.apply(
        tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=service
        )
    )


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
    and "label": int32 (B,), -1 when the dataset has no labels or with_labels=False.
    colour="none" only normalises the views (float32, no "draws"). The batches from step k on
    are the same whether the iterator started at 0 or at start_step=k. `service`: the address
    of a tf.data service dispatcher (`python -m vicregl_jax.data.service`) that makes the
    batches on its workers; folder datasets only, with read.resize="tensorflow".
    """
    groups = tuple(groups)
    _check_pretrain_args(groups, colour)
    grid_sizes = [crops.grid_size(g, stride) for g in groups]
    _check_start_step(start_step)
    hosts = resolve_hosts(global_batch_size, read.process_index, read.process_count)
    source = read.open(dataset, split)
    if service:
        _check_service(service, source, read)
    process = views.pretrain_example(
        groups,
        grid_sizes,
        seed=seed,
        flip_grid=flip_grid,
        with_labels=with_labels,
        dct_method=read.jpeg_dct_method,
        impl=read.resize,
    )

    def finish_batch(batch):
        if colour == "none":
            batch["views"] = tuple(augment.normalise(tf.cast(v, tf.float32) / 255.0) for v in batch["views"])
            del batch["draws"]
        return batch

    ds = stream.shuffled_batches(
        source,
        start_step,
        StreamKeys.of_seed(seed),
        process,
        finish_batch,
        hosts=hosts,
        read=read,
        python_reads=not service,
    )
    if service:
        ds = _distribute(ds, service)
    return endless_iterator(
        ds, start_step, source, read=read, hosts=hosts, global_batch=global_batch_size, reorder=bool(service)
    )


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
    hosts = resolve_hosts(global_batch_size, read.process_index, read.process_count)
    source = read.open(dataset, split)
    num = source.num_examples
    steps = -(-num // global_batch_size)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} is outside the {steps} batches of one pass.")

    def process(encoded, label, position):
        view = centre_view(
            decode_rgb(encoded, read.jpeg_dct_method),
            images.image_size,
            images.resize_size,
            images.interpolation,
            read.resize,
        )
        return {"image": view, "label": tf.cast(label, tf.int32), "position": position}

    def finish_batch(batch):
        # Padding positions try no example (no failure); a failed image is masked, not replaced.
        failed = batch["read_failures"] + batch["decode_failures"] > 0
        valid = (batch["position"] < num) & ~failed
        batch["mask"] = valid
        batch["label"] = tf.where(valid, batch["label"], -1)
        batch["image"] = images.normalise(batch["image"])
        return batch

    ds = stream.pass_batches(source, start_step, steps, process, finish_batch, hosts=hosts, read=read)
    return BatchIterator(
        ds.prefetch(read.prefetch),
        start_step,
        source,
        steps - start_step,
        read=read,
        give_up=False,
        process_index=hosts.index,
        global_batch=global_batch_size,
    )


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
    hosts = resolve_hosts(global_batch_size, read.process_index, read.process_count)
    _check_start_step(start_step)
    source = read.open(dataset, split)

    def process(encoded, label, position):
        per_group = views.make_views(
            encoded,
            position_seed(position, seed),
            (group,),
            (1,),
            False,
            read.jpeg_dct_method,
            images.interpolation,
            impl=read.resize,
        )
        return {
            "image": per_group[0][0][0],
            "label": tf.cast(label, tf.int32),
            "mask": tf.constant(True),
            "position": position,
        }

    def finish_batch(batch):
        batch["image"] = images.normalise(batch["image"])
        return batch

    ds = stream.shuffled_batches(
        source, start_step, StreamKeys.of_seed(seed), process, finish_batch, hosts=hosts, read=read
    )
    return endless_iterator(ds, start_step, source, read=read, hosts=hosts, global_batch=global_batch_size)
