"""What a pre-training step logs besides its loss: the online classifier's cross-entropy and
top-k accuracy, and the collapse metrics of the representation and the embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vicregl_jax import sharding


def _as_f32(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def classifier_terms(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Returns the online classifier's cross-entropy and top-1 / top-5 accuracy in percent.

    Examples whose label is negative (unlabelled data) are left out of all three.
    """
    logits = _as_f32(logits)
    valid = labels >= 0
    count = jnp.maximum(jnp.sum(valid), 1)
    safe = jnp.where(valid, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    top1 = jnp.sum(topk_hits(logits, safe, 1) & valid) / count * 100.0
    top5 = jnp.sum(topk_hits(logits, safe, 5) & valid) / count * 100.0
    return {"cls_loss": jnp.sum(jnp.where(valid, ce, 0.0)) / count, "top1": top1, "top5": top5}


def topk_hits(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Returns, per row of scores (B, C), whether its label is among its k highest scores
    (k at most C; of equal scores the lower class index ranks first)."""

    def hits(scores, labels):
        _, top = jax.lax.top_k(scores, min(k, scores.shape[-1]))
        return jnp.any(top == labels[:, None], axis=-1)

    return sharding.per_example(hits)(scores, labels)


def _std_metric(x: jax.Array) -> jax.Array:
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return jnp.mean(jnp.std(x, axis=0, ddof=1))


def _correlation_metric(x: jax.Array) -> jax.Array:
    """Mean off-diagonal entry of the correlation matrix, in O(B * D): the sum of all entries of
    Z^T Z is ||Z 1||^2 and its trace is ||Z||_F^2, so the D x D matrix is never formed."""
    b, d = x.shape
    z = (x - jnp.mean(x, axis=0, keepdims=True)) / (jnp.std(x, axis=0, ddof=1) + 1e-5)
    total = jnp.sum(jnp.square(jnp.sum(z, axis=1)))
    trace = jnp.sum(jnp.square(z))
    return (total - trace) / (b - 1) / (d * (d - 1))


def collapse_metrics(representation: jax.Array, embedding: jax.Array | None = None) -> dict:
    """Returns stdr / corr of the representation and stde / core of the embedding (view 0).

    std: mean over dimensions of the batch std of the L2-normalised vectors (collapse -> 0;
    1/sqrt(D) for isotropic vectors). corr: mean off-diagonal correlation.
    """
    r = jax.lax.stop_gradient(_as_f32(representation))
    out = {"stdr": _std_metric(r), "corr": _correlation_metric(r)}
    if embedding is not None:
        e = jax.lax.stop_gradient(_as_f32(embedding))
        out.update(stde=_std_metric(e), core=_correlation_metric(e))
    return out
