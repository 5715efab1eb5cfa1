"""Linear segmentation on the frozen feature map (the release's "linear frozen" protocol).

The head is a BatchNorm (batch statistics in training, running averages at test) and a 1x1
convolution (a Dense on every location) on the backbone's last map (B, h, w, C), dropout 0.1
before the convolution; its logits are upsampled bilinearly to the label's size, trained with
cross-entropy that skips the ignore label (255), by SGD (lr 0.01, momentum 0.9, weight decay
5e-4, polynomial decay with power 0.9 down to 1e-4), and scored by the mean IoU over classes
of the confusion matrix accumulated over the validation set.

Deliberate differences from the release (mmsegmentation): its ResNet-50 head sat on a dilated
backbone (output stride 8); ours reads the stride-32 map every backbone produces. Features are
computed once from resized images (no augmentation) and cached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vicregl_jax import models, sharding
from vicregl_jax.data import to_global_batch
from vicregl_jax.data.segmentation import make_segmentation_iterator
from vicregl_jax.evaluate import common

IGNORE_LABEL = 255


def init_head(dim: int, num_classes: int, seed: int = 0) -> tuple[dict, dict]:
    """Returns (params, batch_stats) of BatchNorm + 1x1 conv (kernel ~ N(0, 0.01), bias 0)."""
    params = {
        "bn_scale": jnp.ones((dim,), jnp.float32), "bn_bias": jnp.zeros((dim,), jnp.float32),
        "kernel": 0.01 * jax.random.normal(jax.random.key(seed), (dim, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    stats = {"mean": jnp.zeros((dim,), jnp.float32), "var": jnp.ones((dim,), jnp.float32)}
    return params, stats


def head_apply(params, stats, maps, *, train: bool, dropout_key=None, momentum: float = 0.9, eps: float = 1e-5):
    """Returns (logits (B, h, w, K), new stats) of the head on maps (B, h, w, C)."""
    x = maps.astype(jnp.float32)
    if train:
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.var(x, axis=(0, 1, 2))
        n = x.shape[0] * x.shape[1] * x.shape[2]
        stats = {  # PyTorch keeps the unbiased variance in its running average
            "mean": momentum * stats["mean"] + (1 - momentum) * mean,
            "var": momentum * stats["var"] + (1 - momentum) * var * n / max(n - 1, 1),
        }
    else:
        mean, var = stats["mean"], stats["var"]
    x = (x - mean) / jnp.sqrt(var + eps) * params["bn_scale"] + params["bn_bias"]
    if train and dropout_key is not None:
        keep = jax.random.bernoulli(dropout_key, 0.9, x.shape)
        x = jnp.where(keep, x / 0.9, 0.0)
    return x @ params["kernel"] + params["bias"], stats


def upsample(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Returns logits (B, h, w, K) resized bilinearly (half-pixel centres) to (B, H, W, K)."""
    b, _, _, k = logits.shape
    return jax.image.resize(logits, (b, size[0], size[1], k), method="bilinear")


def masked_cross_entropy(logits, labels) -> jax.Array:
    """Returns the mean cross-entropy over pixels whose label is not IGNORE_LABEL."""
    valid = labels != IGNORE_LABEL
    safe = jnp.where(valid, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Returns the (K, K) counts of (true, predicted) over pixels with a valid label."""
    valid = (labels != IGNORE_LABEL) & (labels < num_classes)
    idx = labels[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(confusion: np.ndarray) -> dict:
    """Returns mIoU over the classes present in labels or predictions, pixel accuracy, per-class IoU."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    return {
        "miou": float(100.0 * np.nanmean(iou)) if present.any() else 0.0,
        "pixel_accuracy": float(100.0 * tp.sum() / max(confusion.sum(), 1)),
        "per_class_iou": [None if np.isnan(v) else float(100.0 * v) for v in iou],
    }


def poly_lr(base_lr: float, steps: int, power: float = 0.9, min_lr: float = 1e-4) -> Callable:
    """Returns mmsegmentation's polynomial schedule lr(step)."""
    return lambda step: (base_lr - min_lr) * (1 - jnp.minimum(step, steps) / steps) ** power + min_lr


def train_segmentation_head(
    train_maps: np.ndarray, train_masks: np.ndarray, *, num_classes: int, steps: int = 2000,
    batch_size: int = 16, lr: float = 0.01, weight_decay: float = 5e-4, seed: int = 0,
) -> tuple[dict, dict]:
    """Returns the trained (params, stats) from cached maps (N, h, w, C) and masks (N, H, W)."""
    n, _, _, dim = train_maps.shape
    if n < 2:
        raise ValueError(f"Linear segmentation needs at least 2 training images; got {n}.")
    batch_size = min(batch_size, n)
    params, stats = init_head(dim, num_classes, seed)
    schedule = poly_lr(lr, steps)
    tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=0.9))
    opt_state = tx.init(params)
    size = train_masks.shape[1:3]

    @jax.jit
    def step(params, stats, opt_state, maps, masks, key, i):
        def loss_fn(p):
            logits, new_stats = head_apply(p, stats, maps, train=True, dropout_key=key)
            return masked_cross_entropy(upsample(logits, size), masks), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - schedule(i) * u, params, updates)
        return params, new_stats, opt_state, loss

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    order = rng.permutation(n)
    pos = 0
    for i in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        params, stats, opt_state, _ = step(params, stats, opt_state, jnp.asarray(train_maps[idx]),
                                           jnp.asarray(train_masks[idx]), jax.random.fold_in(key, i), i)
    return params, stats


def evaluate_segmentation_head(params, stats, batches: Iterator, num_classes: int) -> dict:
    """Returns mean_iou of the head over (maps (B, h, w, C), masks (B, H, W)) batches."""
    predict = jax.jit(lambda maps, size: jnp.argmax(upsample(head_apply(params, stats, maps, train=False)[0], size), -1),
                      static_argnums=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for maps, masks in batches:
        pred = np.asarray(predict(jnp.asarray(maps), tuple(masks.shape[1:3])))
        confusion += confusion_matrix(pred, np.asarray(masks), num_classes)
    return mean_iou(confusion)


def run(config, workdir, weights=None, *, random_init: bool = False, name: str = "segment") -> dict:
    """Runs linear segmentation on the frozen last map; returns and writes mIoU."""
    settings = config.eval.segment
    mesh = sharding.make_mesh(config.mesh.num_devices)
    backbone, description = common.load_backbone(config, workdir, weights, random_init=random_init)
    features = common.make_feature_fn(backbone, mesh)
    batch_size = common.eval_batch_size(config, mesh)
    n = settings.image_size // models.backbone_stride(config.model.arch)

    def cached(split):
        maps, masks = [], []
        for batch in make_segmentation_iterator(settings.dataset, split, global_batch_size=batch_size,
                                                image_size=settings.image_size, data_dir=config.data.data_dir,
                                                process_index=jax.process_index(), process_count=jax.process_count()):
            g = to_global_batch(batch, mesh)
            m, _ = features(g["image"])
            valid = common.fetch(g["valid"]).astype(bool)
            maps.append(common.fetch(m)[valid].reshape(-1, n, n, m.shape[-1]))
            masks.append(common.fetch(g["mask"])[valid])
        return np.concatenate(maps), np.concatenate(masks)

    train_maps, train_masks = cached(settings.train_split)
    params, stats = train_segmentation_head(
        train_maps, train_masks, num_classes=settings.num_classes, steps=settings.steps,
        batch_size=settings.batch_size, seed=config.seed,
    )
    val_maps, val_masks = cached(settings.split)
    chunks = ((val_maps[i:i + batch_size], val_masks[i:i + batch_size]) for i in range(0, len(val_maps), batch_size))
    results = evaluate_segmentation_head(params, stats, chunks, settings.num_classes)
    results.update(weights=description, dataset=f"{settings.dataset} ({settings.train_split} -> {settings.split})",
                   image_size=settings.image_size, steps=settings.steps)
    common.write_results(workdir, name, results)
    return results
