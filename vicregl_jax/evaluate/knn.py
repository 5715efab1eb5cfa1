"""Weighted k-nearest-neighbour classification on frozen pooled features.

The cheap monitor of self-supervised features (Wu et al. 2018; DINO's protocol): cosine
similarity to every training feature, the k most similar vote for their class with weight
exp(similarity / temperature), the class with the largest vote wins. k = 20, T = 0.07.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vicregl_jax import data as data_lib
from vicregl_jax import sharding
from vicregl_jax.evaluate import common
from vicregl_jax.losses import topk_hits


def l2_normalize(x: jax.Array) -> jax.Array:
    """Returns x with unit-norm rows (zero rows stay zero)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_scores(train_features, train_labels, test_features, *, k: int, temperature: float, num_classes: int):
    """Returns (B_test, num_classes) class votes of the k nearest training features of each test row."""
    sims = l2_normalize(test_features) @ l2_normalize(train_features).T  # (B_test, N_train)
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)
    onehot = jax.nn.one_hot(train_labels[top_idx], num_classes)  # (B_test, k, C)
    return jnp.einsum("bk,bkc->bc", weights, onehot)


def knn_classify(train_features, train_labels, test_features, test_labels, *, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> dict:
    """Returns {"top1", "top5"} in percent of weighted kNN over test_features, in test chunks."""
    train_features = np.asarray(train_features)
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    if len(train_features) < 1 or len(test_labels) < 1:
        raise ValueError(f"kNN needs training and test features; got {len(train_features)} and {len(test_labels)}.")
    num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
    k = min(k, len(train_features))
    hits1 = hits5 = 0
    for start in range(0, len(test_labels), chunk):
        scores = knn_scores(train_features, train_labels, np.asarray(test_features[start:start + chunk]),
                            k=k, temperature=temperature, num_classes=num_classes)
        labels = jnp.asarray(test_labels[start:start + chunk])
        hits1 += int(jnp.sum(topk_hits(scores, labels, 1)))
        hits5 += int(jnp.sum(topk_hits(scores, labels, 5)))
    n = len(test_labels)
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n, "k": k, "temperature": temperature}


def check_labelled(config) -> None:
    """Raises ValueError, before any work, if kNN's dataset (config.eval.dataset) has no labels."""
    dataset = common.eval_dataset(config)
    source = data_lib.open_source(dataset, config.eval.split, data_dir=config.data.data_dir,
                                  manual_dir=config.data.manual_dir)
    _require_labels(dataset, source.num_classes)


def _require_labels(dataset: str, num_classes: int) -> None:
    if num_classes == 0:
        raise ValueError(
            f"kNN needs labels, and the dataset {dataset!r} has none: set --config.eval.dataset to a "
            "labelled dataset (e.g. imagenet2012, or vicregl_digits for the demo).")


def evaluate_backbone(backbone, config, mesh) -> dict:
    """Returns kNN results of a backbone (in eval mode) on config.eval's dataset: features of
    config.eval.train_split are the neighbours, config.eval.split is scored."""
    features = common.make_feature_fn(backbone, mesh)
    dataset = common.eval_dataset(config)
    splits = {}
    for split in (config.eval.train_split, config.eval.split):
        iterator = data_lib.make_eval_iterator(
            dataset, split, global_batch_size=common.eval_batch_size(config, mesh),
            image_size=config.eval.image_size, resize_size=config.eval.resize_size,
            data_dir=config.data.data_dir, manual_dir=config.data.manual_dir,
        )
        _require_labels(dataset, iterator.num_classes)
        splits[split] = common.extract_features(features, iterator, mesh)
    train, test = splits[config.eval.train_split], splits[config.eval.split]
    results = knn_classify(train["features"], train["labels"], test["features"], test["labels"],
                           k=config.eval.knn.k, temperature=config.eval.knn.temperature)
    results.update(dataset=f"{dataset} ({config.eval.train_split} -> {config.eval.split})",
                   train_examples=len(train["labels"]), test_examples=len(test["labels"]))
    return results


def run(config, workdir, weights=None, *, random_init: bool = False, name: str = "knn") -> dict:
    """Runs weighted kNN on frozen pooled features of config.eval's dataset; returns and writes results."""
    mesh = sharding.make_mesh(config.mesh.num_devices)
    backbone, description = common.load_backbone(config, workdir, weights, random_init=random_init)
    results = {**evaluate_backbone(backbone, config, mesh), "weights": description}
    common.write_results(workdir, name, results)
    return results
