"""Linear semantic segmentation on frozen features: the release's protocols, in JAX.

The release evaluates with mmsegmentation configs; "release" (the default) reproduces them:

- ResNets: the backbone dilated to output stride 8 (same weights), its last stage (2048
  channels for ResNet-50) -> head = BatchNorm, channel dropout 0.1, 1x1 conv; SGD momentum
  0.9, weight decay 5e-4, lr 0.01 decayed as (1 - t/T)^0.9 to 1e-4; whole-image inference.
- ConvNeXts: the four stages' outputs (no final LayerNorm) resized bilinearly to the stride-4
  map and concatenated (1440 channels for ConvNeXt-S) -> head = BatchNorm, 1x1 conv; AdamW
  lr 1e-4 (8e-5 for XL), betas (0.9, 0.999), weight decay 0.05 on every head parameter, lr
  linear (power 1) to 0 after 1,500 warm-up steps from 1e-6 of it; sliding-window inference
  (crops of the training crop size, stride 341).

Both: the frozen backbone in eval mode, BatchNorm statistics of the head over the global batch
(synchronised), mmsegmentation's training augmentation (vicregl_jax.data.segmentation), logits resized
bilinearly to the crop and a cross-entropy that ignores label 255 but, as mmsegmentation's
default, averages over all pixels; 40k steps of 16 images (VOC, Cityscapes with 8) or 160k
(ADE20k). Test images are rescaled to the dataset's scale keeping their aspect ratio, the
logits resized back to the original resolution and scored there: mIoU as mmsegmentation
computes it (dataset-wide intersection and union per class, classes absent from both the
predictions and the labels left out of the mean), aAcc, mAcc and per-class IoU / accuracy.

"fast" is a quick check, not comparable with the release: the backbone's standard map (stride
32, ConvNeXt's normalised one) of square-resized images computed once, no augmentation, the
same head and optimiser on those cached features, scored at the square resolution.

`evaluate_segmentation` is the entry point (a backbone, a dataset, settings, a mesh);
`run` reads them from a config. The head is trained by evaluate/head_training.py's loop,
checkpointed every `checkpoint_every` steps under workdir/<name>_head; a rerun resumes there
with the same result as an uninterrupted run. The parts: segment_settings.py (the protocol's
settings), segment_head.py (features, head, loss, optimiser), segment_inference.py (whole /
sliding-window scoring, the fast protocol's cache), segment_metrics.py (mIoU and the rest).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vicregl_jax import build, sharding
from vicregl_jax import data as data_lib
from vicregl_jax.checkpoint import Checkpointer
from vicregl_jax.data import to_global_batch
from vicregl_jax.evaluate import common
from vicregl_jax.evaluate.head_training import HeadTraining, head_checkpointer
from vicregl_jax.evaluate.head_training import train_head as train_any_head
from vicregl_jax.evaluate.segment_head import (
    LinearHead,
    dense_features,
    make_optimizer,
    poly_schedule,
    resize_bilinear,
    segmentation_loss,
)
from vicregl_jax.evaluate.segment_inference import (
    cache_features,
    evaluate_cached,
    evaluate_chunks,
    jitted_features,
    make_logits_fn,
    make_scorer,
    release_confusion,
)
from vicregl_jax.evaluate.segment_metrics import confusion_matrix, format_table, segmentation_metrics
from vicregl_jax.evaluate.segment_settings import (
    IGNORE_LABEL,
    PROTOCOLS,
    SegmentSettings,
    backbone_family,
    segment_settings,
    settings_from_config,
)
from vicregl_jax.models import with_output_stride

__all__ = [
    "IGNORE_LABEL",
    "PROTOCOLS",
    "LinearHead",
    "SegmentSettings",
    "backbone_family",
    "confusion_matrix",
    "dense_features",
    "evaluate_chunks",
    "evaluate_segmentation",
    "format_table",
    "make_logits_fn",
    "make_optimizer",
    "make_scorer",
    "poly_schedule",
    "resize_bilinear",
    "run",
    "segment_settings",
    "segmentation_loss",
    "segmentation_metrics",
    "train_head",
]


def train_head(
    head: LinearHead,
    featurize: Callable,
    next_batch: Callable[[int], dict],
    settings: SegmentSettings,
    mesh,
    *,
    seed: int,
    checkpointer: Checkpointer | None = None,
    stop_after_steps: int | None = None,
    progress: bool = True,
) -> int:
    """Trains the segmentation head in place for settings.steps steps (resuming from the
    checkpointer); returns the step reached (settings.steps unless stop_after_steps stopped
    it earlier).

    featurize(inputs) -> features (B, h, w, C), traced inside the jitted step; next_batch(t)
    -> the global batch {"input", "mask"} of step t. Dropout keys are fold_in(seed, t), so
    step t does the same whatever run it is in.
    """
    how = _head_training(settings, seed=seed, stop_after_steps=stop_after_steps, progress=progress)
    return _train(
        head, featurize, lambda start: map(next_batch, itertools.count(start)), settings, mesh, how, checkpointer
    )


def _head_training(
    settings: SegmentSettings, *, seed: int, stop_after_steps: int | None, progress: bool
) -> HeadTraining:
    """Returns how the segmentation head is trained: settings.steps steps, a checkpoint every checkpoint_every."""
    return HeadTraining(
        steps=settings.steps,
        seed=seed,
        checkpoint_every=settings.checkpoint_every,
        stop_after_steps=stop_after_steps,
        progress=progress,
        desc="segment head",
    )


def _train(head, featurize, batches, settings, mesh, how: HeadTraining, checkpointer) -> int:
    """train_head over batches(start), an iterator of the batches from step start on."""

    def loss_fn(net, batch, key):
        features = jax.lax.stop_gradient(featurize(batch["input"]))
        return segmentation_loss(net(features, dropout_key=key), batch["mask"])

    reached, _ = train_any_head(head, make_optimizer(settings), loss_fn, batches, how, mesh, checkpointer=checkpointer)
    return reached


def evaluate_segmentation(
    backbone: nnx.Module,
    dataset: str,
    *,
    mesh,
    settings: SegmentSettings | None = None,
    workdir: str | None = None,
    seed: int = 0,
    name: str = "segment",
    arch: str = "",
    stop_after_steps: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains a linear head on the frozen backbone and returns its metrics on dataset.

    dataset: "voc:PATH", "ade20k:PATH" or "cityscapes:PATH". settings: None for the release's
    protocol of the backbone's family (and arch) on that dataset (`segment_settings`).
    workdir: where the head is checkpointed (workdir/<name>_head; None: no checkpoints).
    stop_after_steps stops the training there after a checkpoint and returns
    {"stopped_at_step": step}. Returns {"mIoU", "aAcc", "mAcc", "per_class", ...}; it does
    not write them (`run` does).
    """
    family = backbone_family(backbone)
    settings = settings or segment_settings(family, dataset, arch=arch)
    train_split = data_lib.segmentation.open_split(dataset, settings.train_split)
    val_split = data_lib.segmentation.open_split(dataset, settings.split)
    layout = train_split.layout
    backbone, kind = _prepared_backbone(backbone, family, settings, mesh)
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    channels, featurize, batches, cached_eval = _head_inputs(
        backbone, kind, settings, train_split, val_split, mesh, process, seed
    )
    head = LinearHead(channels, layout.num_classes, dropout=settings.dropout, rngs=nnx.Rngs(params=seed))
    meta = {
        "dataset": dataset,
        "arch": arch,
        "num_classes": layout.num_classes,
        "channels": int(channels),
        "seed": seed,
        **dataclasses.asdict(settings),
    }
    checkpointer = head_checkpointer(workdir, name, meta)
    how = _head_training(settings, seed=seed, stop_after_steps=stop_after_steps, progress=progress)
    try:
        reached = _train(head, featurize, batches, settings, mesh, how, checkpointer)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    if reached < settings.steps:
        return {"stopped_at_step": reached}
    if settings.protocol == "release":
        confusion = release_confusion(backbone, head, kind, val_split, settings, mesh, process, progress)
        resolution = "original"
    else:
        confusion = evaluate_cached(head, cached_eval, settings, layout.num_classes, mesh)
        resolution = f"{settings.fast_image_size}x{settings.fast_image_size}"
    return {
        **segmentation_metrics(confusion, layout.class_names),
        "protocol": settings.protocol,
        "dataset": dataset,
        "train_split": f"{settings.train_split} ({len(train_split)} images)",
        "split": f"{settings.split} ({len(val_split)} images)",
        "scored_at": resolution,
        "steps": settings.steps,
        "settings": dataclasses.asdict(settings),
    }


def _head_inputs(backbone, kind, settings, train_split, val_split, mesh, process, seed) -> tuple:
    """Returns (the head's input channels, featurize, batches(start), the cached eval features or
    None) for the protocol: the backbone traced in the step (release) or features cached once (fast)."""
    if settings.protocol == "release":
        probe = jax.ShapeDtypeStruct((1, *settings.crop_size, 3), jnp.float32)
        channels = nnx.eval_shape(lambda m, x: dense_features(m, x, kind), backbone, probe).shape[-1]
        featurize = _featurizer(backbone, kind, mesh)
        return channels, featurize, _release_batches(train_split, settings, mesh, process, seed), None
    feature_fn = jitted_features(backbone, kind, mesh)
    cached = {
        split_name: cache_features(feature_fn, split, settings, mesh, process)
        for split_name, split in (("train", train_split), ("eval", val_split))
    }
    channels = cached["train"]["features"].shape[-1]
    featurize = lambda features: features.astype(jnp.float32)  # noqa: E731
    return channels, featurize, _cached_batches(cached["train"], settings, seed, mesh, process), cached["eval"]


def _prepared_backbone(backbone, family, settings, mesh) -> tuple[nnx.Module, str]:
    """Returns (the backbone in eval mode, dilated for the "last" features of a ResNet, the
    kind of features the head reads); checks the batch sizes against the devices."""
    backbone.eval()
    kind = settings.features if settings.protocol == "release" else "map"
    if kind == "last" and family == "resnet":
        backbone = with_output_stride(backbone, settings.output_stride)
    elif kind == "last" and settings.output_stride != 32:
        raise ValueError(f"output_stride={settings.output_stride} needs a ResNet backbone")
    for key in ("batch_size", "eval_batch_size"):
        if getattr(settings, key) % mesh.size:
            raise ValueError(f"segment {key}={getattr(settings, key)} must be a multiple of the {mesh.size} devices")
    return backbone, kind


def _featurizer(backbone, kind, mesh) -> Callable:
    """Returns featurize(images) -> the frozen backbone's dense features, to trace in the step."""
    graph, state = nnx.split(backbone)
    state = jax.device_put(state, sharding.replicated(mesh))
    return lambda images: dense_features(nnx.merge(graph, state, copy=True), images, kind)


def _release_batches(train_split, settings, mesh, process, seed) -> Callable:
    """Returns batches(start): the release protocol's augmented batches from step start on,
    put on the mesh by a thread ahead of the step (close the iterator when done)."""

    def batches(start):
        iterator = data_lib.prefetch_to_mesh(
            data_lib.segmentation.make_train_iterator(
                train_split,
                global_batch_size=settings.batch_size,
                seed=seed,
                start_step=start,
                scale=settings.scale,
                crop_size=settings.crop_size,
                ratio_range=settings.ratio_range,
                cat_max_ratio=settings.cat_max_ratio,
                **process,
            ),
            mesh,
        )
        return _Renamed(iterator)

    return batches


class _Renamed:
    """The segmentation iterator's {"image", "mask"} batches as the head's {"input", "mask"}."""

    def __init__(self, iterator):
        self.iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        return {"input": batch["image"], "mask": batch["mask"]}

    def close(self) -> None:
        """Stops the iterator's threads."""
        self.iterator.close()


def _cached_batches(cached, settings, seed, mesh, process) -> Callable:
    """Returns batches(start) over cached features: a permutation per epoch drawn from
    (seed, epoch), batch t = positions t*B ... of that stream; this host's rows only."""
    count, size = len(cached["mask"]), settings.batch_size
    local = size // process["process_count"]
    first = process["process_index"] * local

    def batch(step):
        positions = step * size + first + np.arange(local)
        epochs = positions // count
        index = np.array(
            [np.random.default_rng([seed, e]).permutation(count)[p % count] for p, e in zip(positions, epochs)]
        )
        return to_global_batch({"input": cached["features"][index], "mask": cached["mask"][index]}, mesh)

    return lambda start: map(batch, itertools.count(start))


def run(
    config, workdir, weights=None, *, random_init: bool = False, name: str = "segment", check: bool = True
) -> dict[str, Any]:
    """Runs config.eval.segment on the backbone to evaluate; writes workdir/eval_<name>.json.

    Reads config.model (the architecture for random_init and release files, the compute
    settings always), config.seed, config.mesh.num_devices and config.eval.segment: dataset
    ("voc:PATH" | "ade20k:PATH" | "cityscapes:PATH"), protocol ("release" | "fast") and any
    SegmentSettings field (None: the release's value for the loaded backbone's family and
    arch). check: run the config check first (main.py has run it).
    """
    if check:
        build.check_config(config, "segment", workdir=workdir)
    mesh = sharding.make_mesh(config.mesh.num_devices)
    loaded = common.load_backbone(config, workdir, weights, random_init=random_init)
    settings = settings_from_config(config.eval.segment, backbone_family(loaded.backbone), arch=loaded.arch)
    results = evaluate_segmentation(
        loaded.backbone,
        config.eval.segment.dataset,
        mesh=mesh,
        settings=settings,
        workdir=workdir,
        seed=config.seed,
        name=name,
        arch=loaded.arch,
    )
    results["weights"] = loaded.description
    if jax.process_index() == 0:
        print(format_table(results), flush=True)
    common.write_results(workdir, name, results)
    return results
