"""The segmentation head and what trains it: the frozen features it reads (the last stage of
a dilated ResNet, or a ConvNeXt's four stages concatenated at stride 4), BatchNorm + channel
dropout + 1x1 conv, mmsegmentation's cross-entropy and mmcv's poly schedule with warm-up.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vicregl_jax.evaluate.segment_settings import IGNORE_LABEL, SegmentSettings
from vicregl_jax.models.layers import BatchNorm


class LinearHead(nnx.Module):
    """BatchNorm, channel dropout (whole maps, as Dropout2d), 1x1 conv: features (B, h, w, C)
    -> logits (B, h, w, num_classes), float32.

    Under jit with the batch sharded over a mesh the BatchNorm statistics are global (a
    synchronised BatchNorm). The conv starts at N(0, 0.01) weights and zero bias.
    """

    def __init__(self, in_channels: int, num_classes: int, *, dropout: float = 0.0, rngs: nnx.Rngs):
        self.norm = BatchNorm(in_channels)
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2)) if dropout > 0 else None
        self.classifier = nnx.Linear(
            in_channels,
            num_classes,
            kernel_init=nnx.initializers.normal(0.01),
            bias_init=nnx.initializers.zeros,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

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
        side = int(round(n**0.5))
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
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, masks, 0).astype(jnp.int32))
    return jnp.sum(jnp.where(valid, ce, 0.0)) / masks.size


def poly_schedule(
    lr: float, steps: int, *, power: float, min_lr: float, warmup_steps: int = 0, warmup_ratio: float = 1e-6
) -> optax.Schedule:
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
    schedule = poly_schedule(
        settings.lr,
        settings.steps,
        power=settings.power,
        min_lr=settings.min_lr,
        warmup_steps=settings.warmup_steps,
        warmup_ratio=settings.warmup_ratio,
    )
    if settings.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(settings.weight_decay), optax.sgd(schedule, momentum=0.9))
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=settings.weight_decay)
