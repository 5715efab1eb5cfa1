"""Segmentation scores as mmsegmentation computes them: a dataset-wide confusion matrix, then
mIoU (classes absent from both labels and predictions left out), aAcc, mAcc and per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vicregl_jax.evaluate.segment_settings import IGNORE_LABEL


def confusion_matrix(
    pred: jax.Array, labels: jax.Array, num_classes: int, weights: jax.Array | None = None
) -> jax.Array:
    """Returns the (K, K) int32 counts of (label, prediction) over pixels whose label is not
    255 (and whose weight is true)."""
    keep = labels != IGNORE_LABEL
    if weights is not None:
        keep = keep & weights
    index = jnp.where(keep, labels.astype(jnp.int32) * num_classes + pred.astype(jnp.int32), 0)
    counts = jnp.bincount(
        index.reshape(-1), weights=keep.reshape(-1).astype(jnp.int32), length=num_classes * num_classes
    )
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
        "mIoU": mean(iou),
        "aAcc": float(100 * intersection.sum() / max(area_label.sum(), 1)),
        "mAcc": mean(acc),
        "per_class": {name: {"IoU": i, "Acc": a} for name, i, a in zip(class_names, listed(iou), listed(acc))},
    }


def format_table(metrics: dict[str, Any]) -> str:
    """Returns the per-class IoU / Acc and the summary as a markdown table."""

    def cell(value):
        return "-" if value is None else f"{value:.2f}"

    width = max(len("class"), *(len(name) for name in metrics["per_class"]))
    lines = [f"| {'class':<{width}} | IoU    | Acc    |", f"|{'-' * (width + 2)}|--------|--------|"]
    for name, values in metrics["per_class"].items():
        lines.append(f"| {name:<{width}} | {cell(values['IoU']):>6} | {cell(values['Acc']):>6} |")
    lines.append(
        f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  "
        f"aAcc {metrics['aAcc']:.2f}  (classes with no label and no prediction: -)"
    )
    return "\n".join(lines)
