"""Segmentation batches on the shared position stream: mmsegmentation's training augmentation,
the test-time rescale in chunks of one image size, and the square resize of the fast protocol.

Each example is an (image, mask) pair of files, read together in one Python call per step
(transient errors retried) and decoded in the graph (the mask by PIL, as class indices).
Training examples (`make_train_iterator`) follow mmsegmentation's pipeline: rescale the
(long, short) scale by a ratio drawn in [0.5, 2.0], keeping the aspect ratio (bilinear image,
nearest mask); random crop, redrawn up to 10 times while one class fills 75% or more of the
crop's labelled pixels; horizontal flip with p 0.5; photometric distortion (brightness,
contrast, saturation, hue, each with p 0.5, on uint8 with OpenCV's HSV conversion); normalise;
pad to the crop size with 0 (mask 255). Batch t is a function of (seed, t) (the stream's
positions and epoch shuffles), so resuming at step t is a seek; a pair that cannot be read or
decoded is replaced by another and counted, and training stops when too many fail, as in
pre-training. Test images (`make_eval_iterator`) are rescaled to the scale keeping the aspect
ratio; their masks stay at the original resolution; a pair that fails there is not scored
(valid False) and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import io
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from vicregl_jax.data import sources, stream
from vicregl_jax.data.iterator import BatchIterator, endless_iterator
from vicregl_jax.data.options import ReadOptions, resolve_hosts
from vicregl_jax.data.segmentation import draws as slots
from vicregl_jax.data.segmentation.crops import (
    normalise,
    random_crop,
    rescale_size,
    rescale_size_tf,
    resize_image,
    resize_mask,
)
from vicregl_jax.data.segmentation.layouts import IGNORE_LABEL, SegmentationSplit, decode_mask
from vicregl_jax.data.segmentation.photometric import photometric_distortion

# Threads, prefetch and the failure rule of the segmentation iterators: the defaults.
_READ = ReadOptions()
_LENGTH_BYTES = 8  # a pair's record: the image's length, the image, the mask


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# What a position whose tries all failed is made of: a black pixel with an ignored label.
_PLACEHOLDER = (sources.PLACEHOLDER_PNG, _png(np.full((1, 1), IGNORE_LABEL, np.uint8)))


def _unpack(record: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (image bytes, mask bytes) of a pair's record."""
    del label
    size = tf.io.decode_raw(tf.strings.substr(record, 0, _LENGTH_BYTES), tf.int64, little_endian=True)[0]
    rest = tf.cast(tf.strings.length(record), tf.int64) - _LENGTH_BYTES - size
    start = tf.constant(_LENGTH_BYTES, tf.int64)
    return tf.strings.substr(record, start, size), tf.strings.substr(record, start + size, rest)


def split_source(split: SegmentationSplit) -> sources.ImageSource:
    """Returns the source of a split's (image, mask) pairs, each read as one record."""
    images, masks = split.images, split.masks

    def read_records(indices):
        count = len(indices)
        data, errors = sources.read_files([images[i] for i in indices] + [masks[i] for i in indices])
        records, failures = [], []
        for image, mask, image_error, mask_error in zip(data[:count], data[count:], errors[:count], errors[count:]):
            ok = image_error is None and mask_error is None
            records.append(len(image).to_bytes(_LENGTH_BYTES, "little") + image + mask if ok else None)
            failures.append(image_error or mask_error)
        return records, [-1] * count, failures

    return sources.ImageSource(
        name=f"{split.layout.name}:{split.root} ({split.split})",
        num_examples=len(split),
        num_classes=split.layout.num_classes,
        read_records=read_records,
        parse=_unpack,
        describe=lambda i: f"{images[i]} / {masks[i]}",
        placeholder=_PLACEHOLDER,
    )


def _pair_decoder(split: SegmentationSplit):
    """Returns decode(image bytes, mask bytes) -> (uint8 image (H, W, 3), uint8 mask (H, W)),
    which fails on a mask that is not of class indices or not of the image's size."""
    is_png = split.images[0].lower().endswith(".png")
    num_classes, reduce_zero = split.layout.num_classes, split.layout.reduce_zero_label

    def mask_from_bytes(data, image_shape):
        mask = decode_mask(bytes(data), num_classes=num_classes, reduce_zero_label=reduce_zero)
        if mask.shape != tuple(image_shape[:2]):
            raise ValueError(
                f"the mask is {mask.shape[0]}x{mask.shape[1]} but its image is {image_shape[0]}x{image_shape[1]}"
            )
        return mask

    def decode(image_bytes, mask_bytes):
        # JPEGs with the accurate integer DCT: the decoder OpenCV and PIL use.
        if is_png:
            image = tf.io.decode_png(image_bytes, channels=3)
        else:
            image = tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE")
        mask = tf.numpy_function(mask_from_bytes, [mask_bytes, tf.shape(image)], tf.uint8, stateful=False)
        return image, tf.ensure_shape(mask, [None, None])

    return decode


def _failed(batch) -> tf.Tensor:
    return batch["read_failures"] + batch["decode_failures"] > 0


def make_train_iterator(
    split: SegmentationSplit,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    scale: Sequence[int] | None = None,
    crop_size: Sequence[int] | None = None,
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    process_index: int = 0,
    process_count: int = 1,
) -> BatchIterator:
    """Returns the endless iterator of this host's training batches {"image" (b, ch, cw, 3)
    float32 normalised, "mask" (b, ch, cw) uint8}, b = global_batch_size / process_count, from
    step start_step on.

    Host p holds rows p*b .. (p+1)*b - 1 of every global batch; batch t is a function of
    (seed, t) only. scale / crop_size default to the layout's.
    """
    hosts = resolve_hosts(global_batch_size, process_index, process_count)
    layout = split.layout
    long_edge, short_edge = (float(max(scale or layout.scale)), float(min(scale or layout.scale)))
    crop_h, crop_w = crop_size or layout.crop_size
    decode = _pair_decoder(split)
    low, high = float(ratio_range[0]), float(ratio_range[1])
    root = tf.constant([seed, 0], tf.int64)
    keys = stream.StreamKeys(*(tuple(int(k) for k in stream.fold(root, salt).numpy()) for salt in (0, 1)))

    def process(image_bytes, mask_bytes, position):
        draws = tf.random.stateless_uniform([slots.NUM_DRAWS], stream.position_key(position, keys.example))
        image, mask = decode(image_bytes, mask_bytes)
        ratio = tf.cast(low + (high - low) * draws[slots.RATIO], tf.float64)
        height, width = rescale_size_tf(
            tf.shape(mask)[0], tf.shape(mask)[1], tf.floor(long_edge * ratio), tf.floor(short_edge * ratio)
        )
        image = resize_image(image, height, width)
        mask = resize_mask(mask, height, width)
        image, mask = random_crop(image, mask, draws, (crop_h, crop_w), cat_max_ratio)
        flip = draws[slots.FLIP] < 0.5
        image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
        mask = tf.cond(flip, lambda: mask[:, ::-1], lambda: mask)
        image = normalise(photometric_distortion(image, draws))
        pad_h, pad_w = crop_h - tf.shape(mask)[0], crop_w - tf.shape(mask)[1]
        image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
        mask = tf.pad(mask, [[0, pad_h], [0, pad_w]], constant_values=IGNORE_LABEL)
        return {
            "image": tf.ensure_shape(image, [crop_h, crop_w, 3]),
            "mask": tf.ensure_shape(mask, [crop_h, crop_w]),
            "position": position,
        }

    source = split_source(split)
    ds = stream.shuffled_batches(source, start_step, keys, process, lambda batch: batch, hosts=hosts, read=_READ)
    return endless_iterator(ds, start_step, source, read=_READ, hosts=hosts, global_batch=global_batch_size)


@dataclasses.dataclass(frozen=True)
class EvalChunk:
    """Images of one original size evaluated together (a multiple of the mesh size).

    indices: global example indices; rows past `count` repeat the first (valid False).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    indices: tuple[int, ...]
    count: int

    @property
    def valid(self) -> np.ndarray:
        """Returns whether each row is scored (bool, one per index)."""
        return np.arange(len(self.indices)) < self.count


def eval_chunks(
    sizes: Sequence[tuple[int, int]], *, scale: Sequence[int], images_per_chunk: int, row_multiple: int
) -> list[EvalChunk]:
    """Returns the evaluation schedule: images grouped by original size (sorted), in chunks of
    at most images_per_chunk, each padded to a multiple of row_multiple rows.

    Every host computes the same schedule from the same sizes, so that they run the same
    sequence of programs.
    """
    if images_per_chunk % row_multiple:
        raise ValueError(f"images_per_chunk={images_per_chunk} must be a multiple of {row_multiple} (the devices)")
    groups = collections.defaultdict(list)
    for index, size in enumerate(sizes):
        groups[tuple(size)].append(index)
    chunks = []
    for size in sorted(groups):
        indices = groups[size]
        resized = rescale_size(size[0], size[1], scale)
        for start in range(0, len(indices), images_per_chunk):
            part = indices[start : start + images_per_chunk]
            rows = -(-len(part) // row_multiple) * row_multiple
            chunks.append(EvalChunk(size, resized, tuple(part + [part[0]] * (rows - len(part))), len(part)))
    return chunks


def _host_rows(chunks: Sequence[EvalChunk], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """Returns this host's rows of every chunk, in order: example index, resized and original
    size, and whether the row is scored."""
    rows = collections.defaultdict(list)
    for chunk in chunks:
        if len(chunk.indices) % process_count:
            raise ValueError(f"a chunk of {len(chunk.indices)} rows does not split over {process_count} hosts")
        local = len(chunk.indices) // process_count
        mine = slice(process_index * local, (process_index + 1) * local)
        rows["index"] += chunk.indices[mine]
        rows["resized"] += [chunk.resized_size] * local
        rows["original"] += [chunk.original_size] * local
        rows["valid"] += list(chunk.valid[mine])
    return {key: np.asarray(value) for key, value in rows.items()}


def _chunk_rows(split: SegmentationSplit, rows: dict[str, np.ndarray]) -> BatchIterator:
    """Returns the iterator of the given rows one at a time: {"image" (1, Hs, Ws, 3) normalised
    at the row's resized size, "mask" (1, H, W) at its original size, "valid" (1,)}."""
    decode = _pair_decoder(split)
    index, resized = tf.constant(rows["index"], tf.int64), tf.constant(rows["resized"], tf.int32)
    original, valid = tf.constant(rows["original"], tf.int32), tf.constant(rows["valid"], tf.bool)

    def process(image_bytes, mask_bytes, position):
        image, mask = decode(image_bytes, mask_bytes)
        height, width = original[position][0], original[position][1]
        # Only a placeholder's mask differs from its row's original size.
        mask = tf.cond(
            tf.reduce_all(tf.shape(mask) == original[position]), lambda: mask, lambda: resize_mask(mask, height, width)
        )
        return {
            "image": normalise(resize_image(image, resized[position][0], resized[position][1])),
            "mask": mask,
            "position": position,
        }

    def finish_batch(batch):
        batch["valid"] = tf.gather(valid, batch["position"]) & ~_failed(batch)
        return batch

    def row_index(position):
        return index[position]

    def one_try(position):  # evaluation never substitutes
        return 1

    # One row a step: the rows of a chunk share a shape, those of consecutive chunks may not.
    source, parallel = split_source(split), _READ.threads()
    order = stream.StreamOrder(positions_of=lambda step: step[None], index_of=row_index, attempts_of=one_try)
    steps = tf.data.Dataset.range(len(rows["index"]))
    ds = stream.examples(source, steps, order, process, (0, 0), parallel=parallel, read_calls=parallel)
    ds = stream.batched(ds, 1, finish_batch, parallel).prefetch(_READ.prefetch)
    return BatchIterator(ds, 0, source, len(rows["index"]), read=_READ, give_up=False)


def make_eval_iterator(
    split: SegmentationSplit, chunks: Sequence[EvalChunk], *, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this host's rows of every chunk: {"image" (b, Hs, Ws, 3) float32 normalised at
    the chunk's resized size, "mask" (b, H, W) uint8 at the original size, "valid" (b,)};
    an image that cannot be read or decoded is not valid (and counted)."""
    rows = _host_rows(chunks, process_index, process_count)
    if not len(rows.get("index", ())):
        return
    examples = _chunk_rows(split, rows)
    try:
        for chunk in chunks:
            items = [next(examples) for _ in range(len(chunk.indices) // process_count)]
            yield {key: np.concatenate([x[key] for x in items]) for key in ("image", "mask", "valid")}
    finally:
        examples.close()


def make_resized_iterator(
    split: SegmentationSplit, *, image_size: int, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> BatchIterator:
    """Returns the iterator of one pass of this host's batches of square-resized pairs, the
    "fast" protocol's input: {"image" (b, S, S, 3) normalised, "mask" (b, S, S) uint8 (nearest),
    "valid" (b,)}; the last batch is padded (mask 255, valid False), every host yields as many
    batches; an image that cannot be read or decoded is not valid (and counted)."""
    hosts = resolve_hosts(global_batch_size, process_index, process_count)
    count = len(split)
    steps = -(-count // global_batch_size)
    decode = _pair_decoder(split)

    def process(image_bytes, mask_bytes, position):
        valid = position < count
        image, mask = decode(image_bytes, mask_bytes)
        return {
            "image": normalise(resize_image(image, image_size, image_size)),
            "mask": tf.where(valid, resize_mask(mask, image_size, image_size), tf.constant(IGNORE_LABEL, tf.uint8)),
            "valid": valid,
            "position": position,
        }

    def finish_batch(batch):
        batch["valid"] = batch["valid"] & ~_failed(batch)
        return batch

    source = split_source(split)
    ds = stream.pass_batches(source, 0, steps, process, finish_batch, hosts=hosts, read=_READ, read_padding=True)
    return BatchIterator(
        ds.prefetch(_READ.prefetch),
        0,
        source,
        steps,
        read=_READ,
        give_up=False,
        process_index=hosts.index,
        global_batch=global_batch_size,
    )
