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

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vicregl_jax import data as data_lib
from vicregl_jax import sharding
from vicregl_jax.data import to_global_batch
from vicregl_jax.evaluate import common
from vicregl_jax.losses import topk_hits


def linear_head(dim: int, num_classes: int, seed: int = 0) -> nnx.Linear:
    """Returns the head: nnx.Linear(dim, num_classes), kernel ~ N(0, 0.01), bias 0 (the release's)."""
    return nnx.Linear(dim, num_classes, kernel_init=nnx.initializers.normal(0.01),
                      bias_init=nnx.initializers.zeros, rngs=nnx.Rngs(seed))


def head_optimizer(lr: float, epochs: int, steps_per_epoch: int, weight_decay: float = 1e-6,
                   momentum: float = 0.9) -> optax.GradientTransformation:
    """Returns torch's SGD (decay added to the gradient, then momentum) with torch's
    CosineAnnealingLR stepped once per epoch (from lr down to 0 over epochs)."""
    per_epoch = optax.cosine_decay_schedule(lr, epochs)
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(lambda count: per_epoch(count // steps_per_epoch), momentum=momentum))


def make_train_step(graphdef):
    """Returns a jitted step(state, features, labels, mask) -> (state, loss) of (head, optimizer)."""

    @jax.jit
    def step(state, features, labels, mask):
        head, optimizer = nnx.merge(graphdef, state)

        def loss_fn(head):
            ce = optax.softmax_cross_entropy_with_integer_labels(head(features.astype(jnp.float32)), labels)
            return jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

        loss, grads = nnx.value_and_grad(loss_fn)(head)
        optimizer.update(head, grads)
        return nnx.state((head, optimizer)), loss

    return step


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
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Trains the head and returns {"top1", "top5", "best_top1", "best_top5", "epochs", ...,
    "head"}.

    train_batches(epoch) yields steps_per_epoch batches (features (B, dim), labels (B,),
    mask (B,)) for one epoch; val_batches() yields the same over the validation set.
    """
    head = linear_head(dim, num_classes, seed)
    optimizer = nnx.Optimizer(head, head_optimizer(lr, epochs, steps_per_epoch, weight_decay), wrt=nnx.Param)
    graphdef, state = nnx.split((head, optimizer))
    step = make_train_step(graphdef)
    best1 = best5 = 0.0
    result = {}
    for epoch in range(epochs):
        losses = []
        for feats, labels, mask in train_batches(epoch):
            state, loss = step(state, jnp.asarray(feats), jnp.asarray(labels), jnp.asarray(mask, bool))
            losses.append(loss)
        nnx.update((head, optimizer), state)
        metrics = evaluate_head(head, val_batches)
        best1, best5 = max(best1, metrics["top1"]), max(best5, metrics["top5"])
        result = {**metrics, "best_top1": best1, "best_top5": best5, "epochs": epoch + 1,
                  "train_loss": float(np.mean(jax.device_get(losses))) if losses else float("nan")}
        if log is not None:
            log(result)
    return {**result, "head": head}


def default_lr(arch: str) -> float:
    """Returns the release's head learning rate: 0.02 for ResNets, 0.3 for ConvNeXts."""
    return 0.3 if arch.startswith("convnext") else 0.02


def run(config, workdir, weights=None, *, random_init: bool = False, name: str = "linear") -> dict:
    """Runs linear classification on frozen features (config.eval.linear.mode: protocol or fast)."""
    settings = config.eval.linear
    if settings.mode not in ("protocol", "fast"):
        raise ValueError(f"config.eval.linear.mode={settings.mode!r}; use 'protocol' or 'fast'.")
    common.check_labelled(config, "Linear evaluation", (config.eval.train_split, config.eval.split))
    mesh = sharding.make_mesh(config.mesh.num_devices)
    backbone, description = common.load_backbone(config, workdir, weights, random_init=random_init)
    features = common.make_feature_fn(backbone, mesh)
    dataset = common.eval_dataset(config)
    batch_size = common.eval_batch_size(config, mesh)
    size = dict(images=data_lib.EvalImages(image_size=config.eval.image_size, resize_size=config.eval.resize_size),
                read=data_lib.ReadOptions.from_config(config.data))

    def centre_features(split):
        iterator = data_lib.make_eval_iterator(dataset, split, global_batch_size=batch_size, **size)
        return common.extract_features(features, iterator, mesh)

    val = centre_features(config.eval.split)
    num_classes = int(max(val["labels"].max(), 0) + 1)

    def val_batches():
        for start in range(0, len(val["labels"]), batch_size):
            f, y = val["features"][start:start + batch_size], val["labels"][start:start + batch_size]
            yield f, y, np.ones(len(y), bool)

    if settings.mode == "fast":
        train = centre_features(config.eval.train_split)
        num_classes = max(num_classes, int(train["labels"].max()) + 1)
        num_train = len(train["labels"])
        steps_per_epoch = -(-num_train // batch_size)
        rng = np.random.default_rng(config.seed)

        def train_batches(epoch):
            order = rng.permutation(num_train)
            for start in range(0, num_train, batch_size):
                idx = order[start:start + batch_size]
                yield train["features"][idx], train["labels"][idx], np.ones(len(idx), bool)
    else:
        augmented = data_lib.make_linear_train_iterator(
            dataset, config.eval.train_split, global_batch_size=batch_size, seed=config.seed, **size)
        num_train = augmented.num_examples
        num_classes = max(num_classes, augmented.num_classes or 0)
        steps_per_epoch = -(-num_train // batch_size)

        def train_batches(epoch):
            for _ in range(steps_per_epoch):
                batch = to_global_batch({k: v for k, v in next(augmented).items() if k in ("image", "label", "mask")},
                                        mesh)
                _, pooled = features(batch["image"])
                yield (common.fetch(pooled), common.fetch(batch["label"]), common.fetch(batch["mask"]).astype(bool))

    lr = settings.lr or default_lr(config.model.arch)
    result = train_linear_head(
        train_batches, val_batches, dim=val["features"].shape[1], num_classes=num_classes,
        steps_per_epoch=steps_per_epoch, epochs=settings.epochs, lr=lr, weight_decay=settings.weight_decay,
        seed=config.seed,
    )
    result.pop("head")
    result.update(weights=description, mode=settings.mode, lr_head=lr, train_examples=num_train,
                  val_examples=len(val["labels"]),
                  dataset=f"{dataset} ({config.eval.train_split} -> {config.eval.split})")
    common.write_results(workdir, name, result)
    return result
