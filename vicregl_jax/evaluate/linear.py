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

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vicregl_jax import data as data_lib
from vicregl_jax import sharding
from vicregl_jax.checkpoint import Checkpointer
from vicregl_jax.data import to_global_batch
from vicregl_jax.evaluate import common
from vicregl_jax.evaluate.head_training import HeadTraining, head_checkpointer, train_head
from vicregl_jax.metrics import topk_hits


def linear_head(dim: int, num_classes: int, seed: int = 0) -> nnx.Linear:
    """Returns the head: nnx.Linear(dim, num_classes), kernel ~ N(0, 0.01), bias 0 (the release's)."""
    return nnx.Linear(
        dim,
        num_classes,
        kernel_init=nnx.initializers.normal(0.01),
        bias_init=nnx.initializers.zeros,
        rngs=nnx.Rngs(seed),
    )


def head_optimizer(
    lr: float, epochs: int, steps_per_epoch: int, weight_decay: float = 1e-6, momentum: float = 0.9
) -> optax.GradientTransformation:
    """Returns torch's SGD (decay added to the gradient, then momentum) with torch's
    CosineAnnealingLR stepped once per epoch (from lr down to 0 over epochs)."""
    per_epoch = optax.cosine_decay_schedule(lr, epochs)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(lambda count: per_epoch(count // steps_per_epoch), momentum=momentum),
    )


def masked_cross_entropy(head: nnx.Module, batch, key=None) -> jax.Array:
    """Returns the mean cross-entropy of the head's logits over the real rows of a batch
    (features (B, dim), labels (B,), mask (B,))."""
    features, labels, mask = batch
    ce = optax.softmax_cross_entropy_with_integer_labels(head(features.astype(jnp.float32)), labels)
    return jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


@jax.jit
def _hits(head_state, graphdef, features, labels, mask):
    head = nnx.merge(graphdef, head_state)
    logits = head(features.astype(jnp.float32))
    return jnp.sum(topk_hits(logits, labels, 1) & mask), jnp.sum(topk_hits(logits, labels, 5) & mask)


def evaluate_head(head: nnx.Linear, val_batches: Callable[[], Iterator]) -> dict:
    """Returns top-1 / top-5 (percent) of the head over (features, labels, mask) batches."""
    graphdef, head_state = nnx.split(head)
    hits1 = hits5 = n = 0
    for feats, labels, mask in val_batches():
        h1, h5 = _hits(head_state, graphdef, jnp.asarray(feats), jnp.asarray(labels), jnp.asarray(mask, bool))
        hits1, hits5, n = hits1 + int(h1), hits5 + int(h5), n + int(np.sum(mask))
    if n == 0:
        raise ValueError("The validation set is empty: check the eval split of the dataset.")
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n}


def epoch_batches(train_batches: Callable[[int], Iterator], steps_per_epoch: int) -> Callable[[int], Iterator]:
    """Returns batches(start): the batches of train_batches(epoch), epoch after epoch, from
    step start on (the epoch of start is asked for, its earlier batches skipped)."""

    def batches(start):
        epoch, skip = divmod(start, steps_per_epoch)
        for e in itertools.count(epoch):
            for batch in itertools.islice(train_batches(e), skip if e == epoch else 0, None):
                yield tuple(jnp.asarray(x, bool) if i == 2 else jnp.asarray(x) for i, x in enumerate(batch))

    return batches


def _this_device():
    """Returns a mesh of this process's first device: the head of cached features trains there."""
    return jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), (sharding.DATA_AXIS,))


def train_linear_head(
    train_batches: Callable[[int], Iterator],
    val_batches: Callable[[], Iterator],
    *,
    dim: int,
    num_classes: int,
    steps_per_epoch: int,
    epochs: int = 100,
    lr: float = 0.02,
    weight_decay: float = 1e-6,
    seed: int = 0,
    mesh=None,
    checkpointer: Checkpointer | None = None,
    checkpoint_every_epochs: int = 10,
    progress: bool = False,
) -> dict:
    """Trains the head (resuming from the checkpointer) and returns {"top1", "top5",
    "best_top1", "best_top5", "epochs", "train_loss", "head"}: the last epoch's scores, the
    best over epochs, and the head.

    train_batches(epoch) yields steps_per_epoch batches (features (B, dim), labels (B,),
    mask (B,)) for one epoch; val_batches() yields the same over the validation set, scored
    after every epoch.
    """
    head = linear_head(dim, num_classes, seed)
    how = HeadTraining(
        steps=epochs * steps_per_epoch,
        seed=seed,
        checkpoint_every=checkpoint_every_epochs * steps_per_epoch,
        evaluate=lambda trained: evaluate_head(trained, val_batches),
        evaluate_every=steps_per_epoch,
        progress=progress,
        desc="linear head",
    )
    _, records = train_head(
        head,
        head_optimizer(lr, epochs, steps_per_epoch, weight_decay),
        masked_cross_entropy,
        epoch_batches(train_batches, steps_per_epoch),
        how,
        mesh or _this_device(),
        checkpointer=checkpointer,
    )
    last = records[-1]
    return {
        "top1": last["top1"],
        "top5": last["top5"],
        "best_top1": max(r["top1"] for r in records),
        "best_top5": max(r["top5"] for r in records),
        "epochs": last["step"] // steps_per_epoch,
        "train_loss": last["train_loss"],
        "head": head,
    }


def default_lr(arch: str) -> float:
    """Returns the release's head learning rate: 0.02 for ResNets, 0.3 for ConvNeXts."""
    return 0.3 if arch.startswith("convnext") else 0.02


def _fast_train_batches(train: dict, batch_size: int, seed: int) -> Callable[[int], Iterator]:
    """Returns train_batches(epoch) over cached features: epoch e in the order of the e-th
    permutation drawn from one generator seeded with seed (drawn in turn, kept for a resume)."""
    rng, orders, count = np.random.default_rng(seed), [], len(train["labels"])

    def train_batches(epoch):
        while len(orders) <= epoch:
            orders.append(rng.permutation(count))
        order = orders[epoch]
        for start in range(0, count, batch_size):
            idx = order[start : start + batch_size]
            yield train["features"][idx], train["labels"][idx], np.ones(len(idx), bool)

    return train_batches


class _ProtocolBatches:
    """train_batches(epoch) of the protocol: fresh random-resized crops and flips of the
    training images through the frozen backbone, the augmented stream sought to the epoch."""

    def __init__(self, make_iterator: Callable[[int], Any], features: Callable, mesh, batch_size: int):
        self.make_iterator, self.features, self.mesh = make_iterator, features, mesh
        self.iterator, self.position = make_iterator(0), 0
        self.num_examples, self.num_classes = self.iterator.num_examples, self.iterator.num_classes or 0
        self.steps_per_epoch = -(-self.num_examples // batch_size)

    def __call__(self, epoch: int) -> Iterator:
        if self.position != epoch * self.steps_per_epoch:  # a resumed run: seek
            self.iterator.close()
            self.iterator = self.make_iterator(epoch * self.steps_per_epoch)
        for _ in range(self.steps_per_epoch):
            keep = {k: v for k, v in next(self.iterator).items() if k in ("image", "label", "mask")}
            batch = to_global_batch(keep, self.mesh)
            self.position += 1
            _, pooled = self.features(batch["image"])
            yield common.fetch(pooled), common.fetch(batch["label"]), common.fetch(batch["mask"]).astype(bool)

    def close(self) -> None:
        """Stops the augmented stream."""
        self.iterator.close()


def _cached_val_batches(val: dict, batch_size: int) -> Callable[[], Iterator]:
    """Returns val_batches() over cached features: (features, labels, all-true mask) in order."""

    def val_batches():
        for start in range(0, len(val["labels"]), batch_size):
            f, y = val["features"][start : start + batch_size], val["labels"][start : start + batch_size]
            yield f, y, np.ones(len(y), bool)

    return val_batches


def _protocol_train_batches(
    config, dataset: str, features: Callable, mesh, batch_size: int, size: dict
) -> _ProtocolBatches:
    """Returns the protocol's _ProtocolBatches over config.eval.train_split of dataset."""
    return _ProtocolBatches(
        lambda start: data_lib.make_linear_train_iterator(
            dataset,
            config.eval.train_split,
            global_batch_size=batch_size,
            seed=config.seed,
            start_step=start,
            **size,
        ),
        features,
        mesh,
        batch_size,
    )


def run(config, workdir, weights=None, *, random_init: bool = False, name: str = "linear", check: bool = True) -> dict:
    """Runs linear classification on frozen features (config.eval.linear.mode: protocol or
    fast); the head is checkpointed under workdir/<name>_head and a rerun resumes there.
    check: run the config check first (main.py has run it)."""
    settings, dataset = config.eval.linear, common.eval_dataset(config)
    mesh, loaded, features, batch_size = common.start(
        config, workdir, weights, "linear", random_init=random_init, check=check
    )
    size = dict(
        images=data_lib.EvalImages(image_size=config.eval.image_size, resize_size=config.eval.resize_size),
        read=data_lib.ReadOptions.from_config(config.data),
    )

    def centre_features(split):
        iterator = data_lib.make_eval_iterator(dataset, split, global_batch_size=batch_size, **size)
        return common.extract_features(features, iterator, mesh)

    val = centre_features(config.eval.split)
    num_classes = int(max(val["labels"].max(), 0) + 1)
    val_batches = _cached_val_batches(val, batch_size)
    if settings.mode == "fast":
        train = centre_features(config.eval.train_split)
        num_classes = max(num_classes, int(train["labels"].max()) + 1)
        num_train = len(train["labels"])
        train_batches = _fast_train_batches(train, batch_size, config.seed)
    else:
        train_batches = _protocol_train_batches(config, dataset, features, mesh, batch_size, size)
        num_train, num_classes = train_batches.num_examples, max(num_classes, train_batches.num_classes)
    lr = settings.lr or default_lr(loaded.arch)
    head = dict(
        dim=val["features"].shape[1],
        num_classes=num_classes,
        steps_per_epoch=-(-num_train // batch_size),
        epochs=settings.epochs,
        lr=lr,
        weight_decay=settings.weight_decay,
        seed=config.seed,
    )
    checkpointer = head_checkpointer(
        workdir,
        name,
        {**head, "dataset": dataset, "mode": settings.mode, "batch_size": batch_size, "weights": loaded.description},
    )
    try:
        result = train_linear_head(
            train_batches,
            val_batches,
            **head,
            checkpointer=checkpointer,
            checkpoint_every_epochs=settings.checkpoint_every_epochs,
        )
    finally:
        for part in (checkpointer, train_batches):
            if hasattr(part, "close"):
                part.close()
    result.pop("head")
    result.update(
        weights=loaded.description,
        mode=settings.mode,
        lr_head=lr,
        train_examples=num_train,
        val_examples=len(val["labels"]),
        dataset=f"{dataset} ({config.eval.train_split} -> {config.eval.split})",
    )
    common.write_results(workdir, name, result)
    return result
