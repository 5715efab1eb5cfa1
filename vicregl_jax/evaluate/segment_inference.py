"""Segmentation inference: the head on the frozen backbone over whole images or sliding
windows, logits resized back to the labels' resolution and scored into a confusion matrix;
and the fast protocol's cached features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from vicregl_jax import data as data_lib
from vicregl_jax import sharding
from vicregl_jax.data import to_global_batch
from vicregl_jax.evaluate import common
from vicregl_jax.evaluate.segment_head import LinearHead, dense_features, resize_bilinear
from vicregl_jax.evaluate.segment_metrics import confusion_matrix
from vicregl_jax.evaluate.segment_settings import SegmentSettings


@jax.jit(static_argnames=("size",))
def _cut(images, top, left, size):
    return jax.lax.dynamic_slice(images, (0, top, left, 0), (images.shape[0], *size, 3))


def make_scorer(num_classes: int) -> Callable:
    """Returns score(window_logits, windows, image_size, masks, valid) -> (K, K) confusion.

    window_logits: per window (top, left, height, width), the head's logits (B, h, w, K) of
    that crop of the (B, *image_size) images; each is resized to its window, the overlaps
    averaged (whole inference: one window), the result resized to the masks' original
    resolution, and the argmax scored against masks (B, H, W) on valid rows.
    """

    @jax.jit(static_argnames=("windows", "image_size"))
    def score(window_logits, windows, image_size, masks, valid):
        b = masks.shape[0]
        if len(windows) == 1:
            logits = resize_bilinear(window_logits[0], image_size)
        else:
            canvas = jnp.zeros((b, *image_size, num_classes), jnp.float32)
            count = np.zeros(image_size, np.float32)
            for logits, (top, left, h, w) in zip(window_logits, windows):
                window = resize_bilinear(logits, (h, w))
                canvas = canvas.at[:, top : top + h, left : left + w].add(window)
                count[top : top + h, left : left + w] += 1
            logits = canvas / count[None, :, :, None]
        pred = jnp.argmax(resize_bilinear(logits, masks.shape[1:3]), axis=-1)
        return confusion_matrix(pred, masks, num_classes, valid[:, None, None])

    return score


def make_logits_fn(backbone: nnx.Module | None, head: LinearHead, kind: str, mesh) -> Callable:
    """Returns logits(inputs) -> (B, h, w, K): the eval-mode head on the frozen features of
    images (or on features themselves when backbone is None), jitted over the mesh."""
    head_graph, head_state = nnx.split(head)
    head_state = jax.device_put(head_state, sharding.replicated(mesh))
    if backbone is None:

        @jax.jit
        def from_features(head_state, features):
            return nnx.merge(head_graph, head_state, copy=True)(features)

        return lambda features: from_features(head_state, features)
    graph, state = nnx.split(backbone)
    state = jax.device_put(state, sharding.replicated(mesh))

    @jax.jit
    def logits(state, head_state, images):
        net = nnx.merge(graph, state, copy=True)
        return nnx.merge(head_graph, head_state, copy=True)(dense_features(net, images, kind))

    return lambda images: logits(state, head_state, images)


def evaluate_chunks(
    logits_fn: Callable,
    batches: Iterator[dict],
    chunks: Sequence,
    settings: SegmentSettings,
    num_classes: int,
    mesh,
    progress: bool = True,
) -> np.ndarray:
    """Returns the dataset-wide (K, K) confusion of the release protocol's inference over the
    evaluation chunks (vicregl_jax.data.segmentation's eval_chunks and make_eval_iterator)."""
    score = make_scorer(num_classes)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    bar = tqdm(
        total=sum(c.count for c in chunks),
        desc="segment eval",
        unit="img",
        disable=not progress or jax.process_index() != 0,
        leave=False,
    )
    for chunk, batch in zip(chunks, batches):
        batch = to_global_batch(batch, mesh)
        height, width = chunk.resized_size
        if settings.inference == "slide":
            windows = tuple(
                data_lib.segmentation.slide_windows(height, width, settings.crop_size, settings.slide_stride)
            )
            window_logits = [logits_fn(_cut(batch["image"], top, left, size=(h, w))) for top, left, h, w in windows]
        else:
            windows = ((0, 0, height, width),)
            window_logits = [logits_fn(batch["image"])]
        confusion += np.asarray(
            jax.device_get(score(tuple(window_logits), windows, (height, width), batch["mask"], batch["valid"]))
        )
        bar.update(chunk.count)
    bar.close()
    return confusion


def release_confusion(backbone, head, kind, val_split, settings, mesh, process, progress):
    """Returns the confusion matrix of the release protocol's scoring: every validation image
    at the test scale, whole or sliding-window inference, at the original label resolution."""
    sizes = data_lib.segmentation.image_sizes(val_split.masks)
    chunks = data_lib.segmentation.eval_chunks(
        sizes, scale=settings.scale, images_per_chunk=settings.eval_batch_size, row_multiple=mesh.size
    )
    batches = data_lib.segmentation.make_eval_iterator(val_split, chunks, **process)
    return evaluate_chunks(
        make_logits_fn(backbone, head, kind, mesh),
        batches,
        chunks,
        settings,
        val_split.layout.num_classes,
        mesh,
        progress,
    )


def jitted_features(backbone: nnx.Module, kind: str, mesh) -> Callable:
    """Returns features(images) -> the frozen dense features of `kind`, jitted over the mesh."""
    graph, state = nnx.split(backbone)
    state = jax.device_put(state, sharding.replicated(mesh))

    @jax.jit
    def features(state, images):
        return dense_features(nnx.merge(graph, state, copy=True), images, kind)

    return lambda images: features(state, images)


def cache_features(feature_fn, split, settings, mesh, process) -> dict[str, np.ndarray]:
    """Returns the fast protocol's cached {"features" float16, "mask"} of a split (all hosts)."""
    features, masks = [], []
    for batch in data_lib.segmentation.make_resized_iterator(
        split, image_size=settings.fast_image_size, global_batch_size=settings.eval_batch_size, **process
    ):
        batch = to_global_batch(batch, mesh)
        valid = common.fetch(batch["valid"]).astype(bool)
        features.append(common.fetch(feature_fn(batch["image"])).astype(np.float16)[valid])
        masks.append(common.fetch(batch["mask"])[valid])
    return {"features": np.concatenate(features), "mask": np.concatenate(masks)}


def evaluate_cached(head: LinearHead, cached: dict, settings: SegmentSettings, num_classes: int, mesh) -> np.ndarray:
    """Returns the fast protocol's (K, K) confusion of the head over cached features, scored
    at the square resolution they were computed at."""
    logits_fn = make_logits_fn(None, head, "map", mesh)
    score = make_scorer(num_classes)
    size = settings.fast_image_size
    confusion = np.zeros((num_classes, num_classes), np.int64)
    n, rows = len(cached["mask"]), settings.eval_batch_size
    for start in range(0, n, rows):  # every host holds all of it: each feeds its share
        take = np.arange(start, start + rows)
        valid = take < n
        take = np.minimum(take, n - 1)
        local = rows // jax.process_count()
        mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
        batch = to_global_batch(
            {"input": cached["features"][take][mine], "mask": cached["mask"][take][mine], "valid": valid[mine]}, mesh
        )
        logits = logits_fn(batch["input"].astype(jnp.float32))
        confusion += np.asarray(
            jax.device_get(score((logits,), ((0, 0, size, size),), (size, size), batch["mask"], batch["valid"]))
        )
    return confusion
