"""Linear classification on frozen features: the release's protocol, in JAX.

A linear head (weights N(0, 0.01), bias 0) on the frozen pooled representation, SGD with
momentum 0.9 and weight decay 1e-6 (on weight and bias, as torch.optim.SGD does), learning
rate lr_head (0.02 for ResNets, 0.3 for ConvNeXts) annealed per epoch by a cosine to 0,
batch 256, 100 epochs; top-1 / top-5 on the validation set after every epoch, the best and
the last reported. The backbone runs in eval mode (BatchNorm running statistics).

Two ways to feed it: `protocol` draws a fresh random-resized-crop + flip of every training
image each epoch and runs the frozen backbone on it (the release's protocol, costly);
`fast` computes the features of the centre crops once and trains on them (no augmentation,
a documented shortcut that is typically a point or two below the protocol).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax


def epoch_cosine_lr(lr: float, epochs: int) -> Callable[[int], float]:
    """Returns lr(epoch): torch's CosineAnnealingLR stepped once per epoch, down to 0."""
    return lambda epoch: lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def init_head(dim: int, num_classes: int, seed: int = 0) -> dict:
    """Returns the head's parameters: kernel (dim, num_classes) ~ N(0, 0.01), bias 0."""
    kernel = 0.01 * jax.random.normal(jax.random.key(seed), (dim, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def head_logits(params: dict, features: jax.Array) -> jax.Array:
    """Returns the head's logits (B, num_classes) in float32."""
    return features.astype(jnp.float32) @ params["kernel"] + params["bias"]


def make_sgd(weight_decay: float = 1e-6, momentum: float = 0.9) -> optax.GradientTransformation:
    """Returns torch's SGD without the learning rate: decay added to the gradient, then
    momentum; the step multiplies by -lr (which changes per epoch) itself."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum))


def make_sgd_step(tx: optax.GradientTransformation):
    """Returns a jitted step(params, opt_state, features, labels, mask, lr) -> (params, opt_state, loss)."""

    @jax.jit
    def step(params, opt_state, features, labels, mask, lr):
        def loss_fn(p):
            ce = optax.softmax_cross_entropy_with_integer_labels(head_logits(p, features), labels)
            return jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, loss

    return step


def accuracy_counts(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """Returns (top-1 hits, top-5 hits) of logits (B, C) against labels (B,)."""
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return int(np.sum(top[:, 0] == labels)), int(np.sum(np.any(top == labels[:, None], axis=1)))


def evaluate_head(params, val_batches: Callable[[], Iterator]) -> dict:
    """Returns top-1 / top-5 (percent) of the head over (features, labels, mask) batches."""
    hits1 = hits5 = n = 0
    for feats, labels, mask in val_batches():
        logits = np.asarray(head_logits(params, jnp.asarray(feats)))
        mask = np.asarray(mask, bool)
        h1, h5 = accuracy_counts(logits[mask], np.asarray(labels)[mask])
        hits1, hits5, n = hits1 + h1, hits5 + h5, n + int(mask.sum())
    if n == 0:
        raise ValueError("The validation set is empty: check the eval split of the dataset.")
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n}


def train_linear_head(
    train_batches: Callable[[int], Iterator],
    val_batches: Callable[[], Iterator],
    *,
    dim: int,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.02,
    weight_decay: float = 1e-6,
    seed: int = 0,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Trains the head and returns {"top1", "top5", "best_top1", "best_top5", "epochs", ...}.

    train_batches(epoch) yields (features (B, dim), labels (B,), mask (B,)) for one epoch;
    val_batches() yields the same over the validation set.
    """
    params = init_head(dim, num_classes, seed)
    tx = make_sgd(weight_decay)
    opt_state = tx.init(params)
    step = make_sgd_step(tx)
    schedule = epoch_cosine_lr(lr, epochs)
    best1 = best5 = 0.0
    result = {}
    for epoch in range(epochs):
        lr_now = jnp.float32(schedule(epoch))
        losses = []
        for feats, labels, mask in train_batches(epoch):
            params, opt_state, loss = step(params, opt_state, jnp.asarray(feats), jnp.asarray(labels),
                                                jnp.asarray(mask, bool), lr_now)
            losses.append(loss)
        metrics = evaluate_head(params, val_batches)
        best1, best5 = max(best1, metrics["top1"]), max(best5, metrics["top5"])
        result = {**metrics, "best_top1": best1, "best_top5": best5, "epochs": epoch + 1,
                  "train_loss": float(np.mean(jax.device_get(losses))) if losses else float("nan")}
        if log is not None:
            log(result)
    return {**result, "params": params}


def default_lr(arch: str) -> float:
    """Returns the release's head learning rate: 0.02 for ResNets, 0.3 for ConvNeXts."""
    return 0.3 if arch.startswith("convnext") else 0.02


def run(config, workdir, weights=None, *, random_init: bool = False, name: str = "linear") -> dict:
    """Runs linear classification on frozen features (config.linear_mode: protocol or fast)."""
    from vicregl_jax import data as data_lib
    from vicregl_jax import sharding
    from vicregl_jax.data import to_global_batch
    from vicregl_jax.evaluate import common

    if config.linear_mode not in ("protocol", "fast"):
        raise ValueError(f"config.linear_mode={config.linear_mode!r}; use 'protocol' or 'fast'.")
    mesh = sharding.make_mesh(config.num_devices)
    backbone, description = common.load_backbone(config, workdir, weights, random_init=random_init)
    features = common.make_feature_fn(backbone, mesh)
    dataset = config.eval_dataset or config.dataset
    batch_size = common.eval_batch_size(config, mesh)
    size = dict(image_size=config.eval_image_size, resize_size=config.eval_resize_size,
                data_dir=config.data_dir, manual_dir=config.manual_dir)

    def centre_features(split):
        iterator = data_lib.make_eval_iterator(dataset, split, global_batch_size=batch_size, **size)
        return common.extract_features(features, iterator, mesh)

    val = centre_features(config.eval_split)
    num_classes = int(max(val["labels"].max(), 0) + 1)

    def val_batches():
        for start in range(0, len(val["labels"]), batch_size):
            f, y = val["features"][start:start + batch_size], val["labels"][start:start + batch_size]
            yield f, y, np.ones(len(y), bool)

    if config.linear_mode == "fast":
        train = centre_features(config.eval_train_split)
        num_classes = max(num_classes, int(train["labels"].max()) + 1)
        rng = np.random.default_rng(config.seed)

        def train_batches(epoch):
            order = rng.permutation(len(train["labels"]))
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield train["features"][idx], train["labels"][idx], np.ones(len(idx), bool)

        num_train = len(train["labels"])
    else:
        augmented = data_lib.make_eval_iterator(
            dataset, config.eval_train_split, global_batch_size=batch_size, train_augment=True, seed=config.seed, **size
        )
        num_train = augmented.num_examples
        num_classes = max(num_classes, augmented.num_classes or 0)
        steps_per_epoch = -(-num_train // batch_size)

        def train_batches(epoch):
            for _ in range(steps_per_epoch):
                batch = to_global_batch({k: v for k, v in next(augmented).items() if k in ("image", "label", "mask")}, mesh)
                _, pooled = features(batch["image"])
                yield (common.fetch(pooled), common.fetch(batch["label"]), common.fetch(batch["mask"]).astype(bool))

    lr = config.linear_lr or default_lr(config.arch)
    result = train_linear_head(
        train_batches, val_batches, dim=val["features"].shape[1], num_classes=num_classes,
        epochs=config.linear_epochs, lr=lr, weight_decay=config.linear_weight_decay, seed=config.seed,
    )
    result.pop("params")
    result.update(weights=description, mode=config.linear_mode, lr_head=lr, train_examples=num_train,
                  val_examples=len(val["labels"]), dataset=f"{dataset} ({config.eval_train_split} -> {config.eval_split})")
    common.write_results(workdir, name, result)
    return result
