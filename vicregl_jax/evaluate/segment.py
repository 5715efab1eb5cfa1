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
(synchronised), mmsegmentation's training augmentation (data/segmentation.py), logits resized
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
`run` reads them from a config. The head is checkpointed every `checkpoint_every` steps under
workdir/<name>_head and a rerun resumes there with the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from tqdm import tqdm

from vicregl_jax import data as data_lib
from vicregl_jax import sharding
from vicregl_jax.data import to_global_batch
from vicregl_jax.evaluate import common
from vicregl_jax.models import ConvNeXt, ResNet, with_output_stride
from vicregl_jax.models.layers import BatchNorm

IGNORE_LABEL = 255  # as data/segmentation.py's masks
PROTOCOLS = ("release", "fast")


# ------------------------------------------------------------------------------ settings

@dataclasses.dataclass(frozen=True)
class SegmentSettings:
    """Everything a segmentation evaluation depends on (see `segment_settings` for defaults).

    features: "last" (the last stage of the ResNet dilated to output_stride) or "concat"
    (all stages resized to the stride-4 map). inference: "whole" or "slide" (windows of
    crop_size every slide_stride pixels). scale: (long, short) bounds of the image rescale.
    warmup_steps / warmup_ratio: lr multiplied by 1 - (1 - t / warmup) (1 - ratio) before
    warmup_steps. eval_batch_size: images per evaluation step (all devices).
    """

    protocol: str
    features: str
    output_stride: int
    dropout: float
    optimizer: str
    lr: float
    weight_decay: float
    power: float
    min_lr: float
    warmup_steps: int
    warmup_ratio: float
    steps: int
    batch_size: int
    crop_size: tuple[int, int]
    scale: tuple[int, int]
    ratio_range: tuple[float, float]
    cat_max_ratio: float
    inference: str
    slide_stride: tuple[int, int]
    eval_batch_size: int
    checkpoint_every: int
    fast_image_size: int
    train_split: str
    split: str


def backbone_family(backbone: nnx.Module) -> str:
    """Returns "resnet" or "convnext", the family whose protocol the backbone gets."""
    if isinstance(backbone, ResNet):
        return "resnet"
    if isinstance(backbone, ConvNeXt):
        return "convnext"
    raise ValueError(f"no segmentation protocol for a {type(backbone).__name__}: use a ResNet "
                     "or a ConvNeXt backbone")


def segment_settings(family: str, dataset: str, *, arch: str = "", **overrides
                     ) -> SegmentSettings:
    """Returns the release's settings for a backbone family ("resnet" | "convnext") on the
    dataset "LAYOUT:PATH", with overrides (None values keep the default).

    arch: the architecture name (convnext_xlarge gets lr 8e-5, as the release).
    """
    layout, _ = data_lib.segmentation.parse_dataset(dataset)
    if family == "resnet":
        base = dict(features="last", output_stride=8, dropout=0.1, optimizer="sgd", lr=0.01,
                    weight_decay=5e-4, power=0.9, min_lr=1e-4, warmup_steps=0,
                    inference="whole")
    elif family == "convnext":
        base = dict(features="concat", output_stride=32, dropout=0.0, optimizer="adamw",
                    lr=8e-5 if arch == "convnext_xlarge" else 1e-4, weight_decay=0.05,
                    power=1.0, min_lr=0.0, warmup_steps=1500, inference="slide")
    else:
        raise ValueError(f"backbone family {family!r}: use 'resnet' or 'convnext'")
    values = dict(protocol="release", warmup_ratio=1e-6, steps=layout.steps,
                  batch_size=layout.batch_size, crop_size=layout.crop_size, scale=layout.scale,
                  ratio_range=(0.5, 2.0), cat_max_ratio=0.75, slide_stride=(341, 341),
                  eval_batch_size=16, checkpoint_every=4000, fast_image_size=320,
                  train_split=layout.train_split, split=layout.eval_split, **base)
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown segmentation settings {unknown}: use some of {sorted(values)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("crop_size", "scale", "slide_stride", "ratio_range"):
        values[key] = tuple(values[key])
    settings = SegmentSettings(**values)
    _check(settings, layout)
    return settings


def _check(s: SegmentSettings, layout) -> None:
    choices = {"protocol": PROTOCOLS, "features": ("last", "concat"),
               "optimizer": ("sgd", "adamw"), "inference": ("whole", "slide"),
               "output_stride": (8, 16, 32)}
    for key, allowed in choices.items():
        if getattr(s, key) not in allowed:
            raise ValueError(f"segment {key}={getattr(s, key)!r}: use one of {allowed}")
    for key in ("steps", "batch_size", "eval_batch_size", "checkpoint_every", "fast_image_size"):
        if getattr(s, key) < 1:
            raise ValueError(f"segment {key}={getattr(s, key)}: use a positive value")
    for key in ("crop_size", "scale", "slide_stride"):
        if len(getattr(s, key)) != 2 or min(getattr(s, key)) < 1:
            raise ValueError(f"segment {key}={getattr(s, key)}: give two positive sizes")
    for key in ("train_split", "split"):
        if getattr(s, key) not in layout.splits:
            raise ValueError(f"segment {key}={getattr(s, key)!r}: {layout.name} has splits "
                             f"{layout.splits}")
    if not 0.0 <= s.dropout < 1.0:
        raise ValueError(f"segment dropout={s.dropout}: use a value in [0, 1)")


# ---------------------------------------------------------------------------- the head

class LinearHead(nnx.Module):
    """BatchNorm, channel dropout (whole maps, as Dropout2d), 1x1 conv: features (B, h, w, C)
    -> logits (B, h, w, num_classes), float32.

    Under jit with the batch sharded over a mesh the BatchNorm statistics are global (a
    synchronised BatchNorm). The conv starts at N(0, 0.01) weights and zero bias.
    """

    def __init__(self, in_channels: int, num_classes: int, *, dropout: float = 0.0,
                 rngs: nnx.Rngs):
        self.norm = BatchNorm(in_channels)
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2)) if dropout > 0 else None
        self.classifier = nnx.Linear(
            in_channels, num_classes, kernel_init=nnx.initializers.normal(0.01),
            bias_init=nnx.initializers.zeros, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        x = self.norm(x.astype(jnp.float32))
        if self.dropout is not None:
            x = self.dropout(x, rngs=dropout_key)
        return self.classifier(x)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Returns x (B, h, w, C) resized to (B, *size, C): bilinear, half-pixel centres, no
    antialiasing (torch's interpolate with align_corners=False, also when shrinking)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


def dense_features(backbone: nnx.Module, images: jax.Array, kind: str) -> jax.Array:
    """Returns the frozen features (B, h, w, C) float32 the head reads.

    kind "last": the last stage's output (dilate a ResNet first); "concat": the four stages
    resized to the first stage's size and concatenated along channels, first stage first.
    "map": the backbone's standard output map (the fast protocol).
    """
    if kind == "map":
        maps, _ = backbone(images)
        b, n, c = maps.shape
        side = int(round(n ** 0.5))
        return maps.reshape(b, side, n // side, c).astype(jnp.float32)
    stages = backbone.stage_maps(images)
    if kind == "last":
        return stages[-1].astype(jnp.float32)
    size = stages[0].shape[1:3]
    return jnp.concatenate([resize_bilinear(s.astype(jnp.float32), size) for s in stages], -1)


def segmentation_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Returns the cross-entropy of logits resized to the masks, summed over labelled pixels
    and divided by all pixels (mmsegmentation's default reduction; 255 contributes 0)."""
    logits = resize_bilinear(logits, masks.shape[1:3])
    valid = masks != IGNORE_LABEL
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(valid, masks, 0).astype(jnp.int32))
    return jnp.sum(jnp.where(valid, ce, 0.0)) / masks.size


def poly_schedule(lr: float, steps: int, *, power: float, min_lr: float, warmup_steps: int = 0,
                  warmup_ratio: float = 1e-6) -> optax.Schedule:
    """Returns mmcv's poly schedule: (lr - min_lr)(1 - t/steps)^power + min_lr, times
    1 - (1 - t/warmup_steps)(1 - warmup_ratio) during a linear warm-up."""
    poly = optax.polynomial_schedule(lr, min_lr, power, steps)
    if not warmup_steps:
        return poly

    def schedule(count):
        factor = 1.0 - (1.0 - count / warmup_steps) * (1.0 - warmup_ratio)
        return poly(count) * jnp.where(count < warmup_steps, factor, 1.0)

    return schedule


def make_optimizer(settings: SegmentSettings) -> optax.GradientTransformation:
    """Returns the head's optimiser: torch's SGD (decay added to the gradient, momentum 0.9) or
    AdamW (betas 0.9 / 0.999, decoupled decay), decaying every head parameter as mmcv does."""
    schedule = poly_schedule(settings.lr, settings.steps, power=settings.power,
                             min_lr=settings.min_lr, warmup_steps=settings.warmup_steps,
                             warmup_ratio=settings.warmup_ratio)
    if settings.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(settings.weight_decay),
                           optax.sgd(schedule, momentum=0.9))
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=settings.weight_decay)


# ------------------------------------------------------------------------------ metrics

def confusion_matrix(pred: jax.Array, labels: jax.Array, num_classes: int,
                     weights: jax.Array | None = None) -> jax.Array:
    """Returns the (K, K) int32 counts of (label, prediction) over pixels whose label is not
    255 (and whose weight is true)."""
    keep = labels != IGNORE_LABEL
    if weights is not None:
        keep = keep & weights
    index = jnp.where(keep, labels.astype(jnp.int32) * num_classes + pred.astype(jnp.int32), 0)
    counts = jnp.bincount(index.reshape(-1), weights=keep.reshape(-1).astype(jnp.int32),
                          length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def segmentation_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Returns mmsegmentation's metrics (percent) of a dataset-wide confusion matrix.

    aAcc: labelled pixels predicted right. IoU per class: intersection / union, NaN (None in
    the output) for a class absent from labels and predictions; mIoU: their mean over the
    others. Acc per class: intersection / labelled pixels (NaN when none); mAcc: mean.
    """
    confusion = np.asarray(confusion, np.float64)
    intersection = np.diag(confusion)
    area_label, area_pred = confusion.sum(1), confusion.sum(0)
    union = area_label + area_pred - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        acc = intersection / area_label
    def mean(values):
        return float(100 * np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    def listed(values):
        return [None if np.isnan(v) else float(100 * v) for v in values]
    return {
        "mIoU": mean(iou), "aAcc": float(100 * intersection.sum() / max(area_label.sum(), 1)),
        "mAcc": mean(acc),
        "per_class": {name: {"IoU": i, "Acc": a}
                      for name, i, a in zip(class_names, listed(iou), listed(acc))},
    }


def format_table(metrics: dict[str, Any]) -> str:
    """Returns the per-class IoU / Acc and the summary as a markdown table."""
    def cell(value):
        return "-" if value is None else f"{value:.2f}"
    width = max(len("class"), *(len(name) for name in metrics["per_class"]))
    lines = [f"| {'class':<{width}} | IoU    | Acc    |",
             f"|{'-' * (width + 2)}|--------|--------|"]
    for name, values in metrics["per_class"].items():
        lines.append(f"| {name:<{width}} | {cell(values['IoU']):>6} | {cell(values['Acc']):>6} |")
    lines.append(f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  "
                 f"aAcc {metrics['aAcc']:.2f}  (classes with no label and no prediction: -)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- inference

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
                canvas = canvas.at[:, top:top + h, left:left + w].add(window)
                count[top:top + h, left:left + w] += 1
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


def evaluate_chunks(logits_fn: Callable, batches: Iterator[dict], chunks: Sequence,
                    settings: SegmentSettings, num_classes: int, mesh,
                    progress: bool = True) -> np.ndarray:
    """Returns the dataset-wide (K, K) confusion of the release protocol's inference over the
    evaluation chunks (data/segmentation.py's eval_chunks and make_eval_iterator)."""
    score = make_scorer(num_classes)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    bar = tqdm(total=sum(c.count for c in chunks), desc="segment eval", unit="img",
               disable=not progress or jax.process_index() != 0, leave=False)
    for chunk, batch in zip(chunks, batches):
        batch = to_global_batch(batch, mesh)
        height, width = chunk.resized_size
        if settings.inference == "slide":
            windows = tuple(data_lib.segmentation.slide_windows(height, width, settings.crop_size,
                                                   settings.slide_stride))
            window_logits = [logits_fn(_cut(batch["image"], top, left, size=(h, w)))
                             for top, left, h, w in windows]
        else:
            windows = ((0, 0, height, width),)
            window_logits = [logits_fn(batch["image"])]
        confusion += np.asarray(jax.device_get(score(
            tuple(window_logits), windows, (height, width), batch["mask"], batch["valid"])))
        bar.update(chunk.count)
    bar.close()
    return confusion


# ----------------------------------------------------------------------------- training

class HeadCheckpoints:
    """Orbax checkpoints of the head's training state under one folder (the newest kept),
    with the settings that wrote them: a different evaluation refuses to resume from them."""

    def __init__(self, directory, meta: dict[str, Any]):
        text = str(directory)
        self.directory = epath.Path(text if "://" in text else os.path.abspath(text))
        self.meta = json.loads(json.dumps(meta))  # as JSON gives it back: tuples -> lists
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """Returns the step of the newest checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Writes state at step (blocking)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.meta)), force=True)

    def restore(self, step: int, target):
        """Returns the state at step laid out like target; ValueError if other settings wrote it."""
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        saved = saved["meta"]
        diff = {k: (saved.get(k), v) for k, v in self.meta.items() if saved.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"the head checkpoint in {self.directory} was written by another "
                             f"evaluation ({listed}): delete that folder or evaluate under "
                             "another name")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), target)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def close(self) -> None:
        self.manager.close()


def train_head(head: LinearHead, featurize: Callable, next_batch: Callable[[int], dict],
               settings: SegmentSettings, mesh, *, seed: int,
               checkpoints: HeadCheckpoints | None = None, stop_after_steps: int | None = None,
               progress: bool = True) -> int:
    """Trains head in place for settings.steps steps (resuming from checkpoints); returns the
    step reached (settings.steps unless stop_after_steps stopped it earlier).

    featurize(inputs) -> features (B, h, w, C), traced inside the jitted step; next_batch(t)
    -> the global batch {"input", "mask"} of step t. Dropout keys are fold_in(seed, t), so
    step t does the same whatever run it is in.
    """
    tx = make_optimizer(settings)
    head.train()
    graph, params, stats = nnx.split(head, nnx.Param, nnx.BatchStat)
    state = {"params": params, "batch_stats": stats, "opt_state": tx.init(params)}
    state = jax.device_put(state, sharding.replicated(mesh))
    start = 0
    if checkpoints is not None and checkpoints.latest_step() is not None:
        start = checkpoints.latest_step()
        state = checkpoints.restore(start, state)
        logging.info("segmentation head: resumed at step %d from %s", start, checkpoints.directory)
    key = jax.random.key(seed)
    replicated = sharding.replicated(mesh)

    @jax.jit(donate_argnums=0, out_shardings=(replicated, replicated))
    def step_fn(state, inputs, masks, step):
        features = jax.lax.stop_gradient(featurize(inputs))

        def loss_fn(params):
            net = nnx.merge(graph, params, state["batch_stats"], copy=True)
            logits = net(features, dropout_key=jax.random.fold_in(key, step))
            return segmentation_loss(logits, masks), nnx.state(net, nnx.BatchStat)

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "batch_stats": stats, "opt_state": opt_state}, loss

    end = settings.steps if stop_after_steps is None else min(settings.steps, stop_after_steps)
    bar = tqdm(total=settings.steps, initial=start, desc="segment head", unit="step",
               disable=not progress or jax.process_index() != 0)
    step = start
    for step in range(start, end):
        batch = next_batch(step)
        state, loss = step_fn(state, batch["input"], batch["mask"], jnp.int32(step))
        done = step + 1
        if done % 50 == 0 or done == end:
            bar.set_postfix(loss=f"{float(loss):.4f}")
        bar.update(1)
        if checkpoints is not None and (done % settings.checkpoint_every == 0 or done == end):
            checkpoints.save(done, state)
        step = done
    bar.close()
    nnx.update(head, state["params"], state["batch_stats"])
    head.eval()
    return step


# ------------------------------------------------------------------------------- entries

def evaluate_segmentation(backbone: nnx.Module, dataset: str, *, mesh,
                          settings: SegmentSettings | None = None, workdir: str | None = None,
                          seed: int = 0, name: str = "segment", arch: str = "",
                          stop_after_steps: int | None = None, progress: bool = True
                          ) -> dict[str, Any]:
    """Trains a linear head on the frozen backbone and returns its metrics on dataset.

    dataset: "voc:PATH", "ade20k:PATH" or "cityscapes:PATH". settings: None for the release's
    protocol of the backbone's family on that dataset (`segment_settings`). workdir: where the
    head is checkpointed (workdir/<name>_head; None: no checkpoints). stop_after_steps stops
    the training there after a checkpoint and returns {"stopped_at_step": step}.
    Returns {"mIoU", "aAcc", "mAcc", "per_class", ...}; it does not write them (`run` does).
    """
    family = backbone_family(backbone)
    settings = settings or segment_settings(family, dataset, arch=arch)
    train_split = data_lib.segmentation.open_split(dataset, settings.train_split)
    val_split = data_lib.segmentation.open_split(dataset, settings.split)
    layout = train_split.layout
    backbone.eval()
    kind = settings.features if settings.protocol == "release" else "map"
    if kind == "last" and family == "resnet":
        backbone = with_output_stride(backbone, settings.output_stride)
    elif kind == "last" and settings.output_stride != 32:
        raise ValueError(f"output_stride={settings.output_stride} needs a ResNet backbone")
    rows = mesh.size
    for key in ("batch_size", "eval_batch_size"):
        if getattr(settings, key) % rows:
            raise ValueError(f"segment {key}={getattr(settings, key)} must be a multiple of "
                             f"the {rows} devices")
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())

    if settings.protocol == "release":
        probe = (1, *settings.crop_size, 3)
        channels = nnx.eval_shape(lambda m, x: dense_features(m, x, kind), backbone,
                                  jax.ShapeDtypeStruct(probe, jnp.float32)).shape[-1]
    else:
        cached = {}
        feature_fn = _jitted_features(backbone, kind, mesh)
        for split_name, split in (("train", train_split), ("eval", val_split)):
            cached[split_name] = _cache_features(feature_fn, split, settings, mesh, process)
        channels = cached["train"]["features"].shape[-1]

    head = LinearHead(channels, layout.num_classes, dropout=settings.dropout,
                      rngs=nnx.Rngs(params=seed))
    meta = {"dataset": dataset, "arch": arch, "num_classes": layout.num_classes,
            "channels": int(channels), "seed": seed, **dataclasses.asdict(settings)}
    checkpoints = (HeadCheckpoints(epath.Path(workdir) / f"{name}_head", meta)
                   if workdir is not None else None)
    try:
        start = (checkpoints.latest_step() or 0) if checkpoints else 0
        if settings.protocol == "release":
            featurize, next_batch, batches = _release_training_inputs(
                backbone, kind, train_split, settings, mesh, process, seed=seed, start=start)
        else:
            featurize, batches = (lambda features: features.astype(jnp.float32)), None
            next_batch = _cached_batches(cached["train"], settings, seed, mesh, process)
        try:
            reached = train_head(head, featurize, next_batch, settings, mesh, seed=seed,
                                 checkpoints=checkpoints, stop_after_steps=stop_after_steps,
                                 progress=progress)
        finally:
            if batches is not None:
                batches.close()
    finally:
        if checkpoints is not None:
            checkpoints.close()
    if reached < settings.steps:
        return {"stopped_at_step": reached}

    if settings.protocol == "release":
        confusion = _release_confusion(backbone, head, kind, val_split, settings, mesh, process, progress)
        resolution = "original"
    else:
        confusion = _evaluate_cached(head, cached["eval"], settings, layout.num_classes, mesh)
        resolution = f"{settings.fast_image_size}x{settings.fast_image_size}"
    metrics = segmentation_metrics(confusion, layout.class_names)
    return {**metrics, "protocol": settings.protocol, "dataset": dataset,
            "train_split": f"{settings.train_split} ({len(train_split)} images)",
            "split": f"{settings.split} ({len(val_split)} images)",
            "scored_at": resolution, "steps": settings.steps,
            "settings": dataclasses.asdict(settings)}


def _release_training_inputs(backbone, kind, train_split, settings, mesh, process, *, seed, start):
    """Returns (featurize, next_batch, batches) of the release protocol's head training: the
    frozen backbone's features of a batch of images, the augmented batches from step `start`
    (put on the mesh by a thread ahead of the step), and that iterator (to close)."""
    graph, state = nnx.split(backbone)
    state = jax.device_put(state, sharding.replicated(mesh))

    def featurize(images):
        return dense_features(nnx.merge(graph, state, copy=True), images, kind)

    batches = data_lib.prefetch_to_mesh(data_lib.segmentation.make_train_iterator(
        train_split, global_batch_size=settings.batch_size, seed=seed,
        start_step=start, scale=settings.scale, crop_size=settings.crop_size,
        ratio_range=settings.ratio_range, cat_max_ratio=settings.cat_max_ratio,
        **process), mesh)

    def next_batch(step):
        batch = next(batches)
        return {"input": batch["image"], "mask": batch["mask"]}

    return featurize, next_batch, batches


def _release_confusion(backbone, head, kind, val_split, settings, mesh, process, progress):
    """Returns the confusion matrix of the release protocol's scoring: every validation image
    at the test scale, whole or sliding-window inference, at the original label resolution."""
    sizes = data_lib.segmentation.image_sizes(val_split.masks)
    chunks = data_lib.segmentation.eval_chunks(sizes, scale=settings.scale,
                                               images_per_chunk=settings.eval_batch_size,
                                               row_multiple=mesh.size)
    batches = data_lib.segmentation.make_eval_iterator(val_split, chunks, **process)
    return evaluate_chunks(make_logits_fn(backbone, head, kind, mesh), batches, chunks,
                           settings, val_split.layout.num_classes, mesh, progress)


def _jitted_features(backbone, kind, mesh):
    graph, state = nnx.split(backbone)
    state = jax.device_put(state, sharding.replicated(mesh))

    @jax.jit
    def features(state, images):
        return dense_features(nnx.merge(graph, state, copy=True), images, kind)

    return lambda images: features(state, images)


def _cache_features(feature_fn, split, settings, mesh, process) -> dict[str, np.ndarray]:
    """Returns the fast protocol's cached {"features" float16, "mask"} of a split (all hosts)."""
    features, masks = [], []
    for batch in data_lib.segmentation.make_resized_iterator(
            split, image_size=settings.fast_image_size,
            global_batch_size=settings.eval_batch_size, **process):
        batch = to_global_batch(batch, mesh)
        valid = common.fetch(batch["valid"]).astype(bool)
        features.append(common.fetch(feature_fn(batch["image"])).astype(np.float16)[valid])
        masks.append(common.fetch(batch["mask"])[valid])
    return {"features": np.concatenate(features), "mask": np.concatenate(masks)}


def _cached_batches(cached, settings, seed, mesh, process) -> Callable[[int], dict]:
    """Returns next_batch(step) over cached features: a permutation per epoch drawn from
    (seed, epoch), batch t = positions t*B ... of that stream; this host's rows only."""
    count, size = len(cached["mask"]), settings.batch_size
    local = size // process["process_count"]
    first = process["process_index"] * local

    def next_batch(step):
        positions = step * size + first + np.arange(local)
        epochs = positions // count
        index = np.array([np.random.default_rng([seed, e]).permutation(count)[p % count]
                          for p, e in zip(positions, epochs)])
        return to_global_batch({"input": cached["features"][index],
                                "mask": cached["mask"][index]}, mesh)

    return next_batch


def _evaluate_cached(head, cached, settings, num_classes, mesh) -> np.ndarray:
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
        batch = to_global_batch({"input": cached["features"][take][mine],
                                 "mask": cached["mask"][take][mine], "valid": valid[mine]}, mesh)
        logits = logits_fn(batch["input"].astype(jnp.float32))
        confusion += np.asarray(jax.device_get(score(
            (logits,), ((0, 0, size, size),), (size, size), batch["mask"], batch["valid"])))
    return confusion


def run(config, workdir, weights=None, *, random_init: bool = False, name: str = "segment"
        ) -> dict[str, Any]:
    """Runs config.eval.segment on the backbone to evaluate; writes workdir/eval_<name>.json.

    Reads config.model.arch, config.seed, config.mesh.num_devices and config.eval.segment:
    dataset ("voc:PATH" | "ade20k:PATH" | "cityscapes:PATH"), protocol ("release" | "fast")
    and any SegmentSettings field (None: the release's value for the backbone's family).
    """
    cfg = config.eval.segment
    if not cfg.get("dataset"):
        raise ValueError("set config.eval.segment.dataset, e.g. "
                         "--config.eval.segment.dataset=voc:/data/VOCdevkit (see the README)")
    mesh = sharding.make_mesh(config.mesh.num_devices)
    backbone, description = common.load_backbone(config, workdir, weights, random_init=random_init)
    fields = {f.name for f in dataclasses.fields(SegmentSettings)}
    unknown = sorted(set(cfg.keys()) - fields - {"dataset"})
    if unknown:
        raise ValueError(f"config.eval.segment.{unknown[0]} is not a segmentation setting (the "
                         "class count comes from the dataset's layout); use "
                         f"{', '.join(sorted(fields | {'dataset'}))}")
    overrides = {k: v for k, v in cfg.items() if k in fields}
    settings = segment_settings(backbone_family(backbone), cfg.dataset, arch=config.model.arch,
                                **overrides)
    results = evaluate_segmentation(backbone, cfg.dataset, mesh=mesh, settings=settings,
                                    workdir=workdir, seed=config.seed, name=name,
                                    arch=config.model.arch)
    results["weights"] = description
    if jax.process_index() == 0:
        print(format_table(results), flush=True)
    common.write_results(workdir, name, results)
    return results
