"""Weighted k-nearest-neighbour classification on frozen pooled features.

The cheap monitor of self-supervised features (Wu et al. 2018; DINO's protocol): cosine
similarity to every training feature, the k most similar vote for their class with weight
exp(similarity / temperature), the class with the largest vote wins. k = 20, T = 0.07.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vicregl_jax import data as data_lib
from vicregl_jax import sharding
from vicregl_jax.data import to_global_batch
from vicregl_jax.evaluate import common
from vicregl_jax.metrics import topk_hits


def l2_normalize(x: jax.Array) -> jax.Array:
    """Returns x with unit-norm rows (zero rows stay zero)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_candidates(train_features, train_labels, queries, k: int):
    """Returns (similarities, labels), each (B_q, k'), of the k' = min(k, N) training rows most
    cosine-similar to each query; rows with a negative label (padding) never count."""
    sims = l2_normalize(queries) @ l2_normalize(train_features).T  # (B_q, N)
    sims = jnp.where(train_labels[None, :] >= 0, sims, -jnp.inf)
    top_sims, top_idx = jax.lax.top_k(sims, min(k, train_features.shape[0]))
    return top_sims, train_labels[top_idx]


def weighted_votes(top_sims, top_labels, *, temperature: float, num_classes: int):
    """Returns (B_q, num_classes) votes: each neighbour adds exp(similarity / T) to its class."""
    weights = jnp.where(jnp.isfinite(top_sims), jnp.exp(top_sims / temperature), 0.0)
    return jnp.einsum("bk,bkc->bc", weights, jax.nn.one_hot(top_labels, num_classes))


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_scores(train_features, train_labels, test_features, *, k: int, temperature: float, num_classes: int):
    """Returns (B_test, num_classes) class votes of the k nearest training features of each test row."""
    top_sims, top_labels = nearest_candidates(train_features, train_labels, test_features, k)
    return weighted_votes(top_sims, top_labels, temperature=temperature, num_classes=num_classes)


def knn_classify(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict:
    """Returns {"top1", "top5"} in percent of weighted kNN over test_features, in test chunks
    (arrays on one device; evaluate_backbone keeps them sharded over a mesh instead)."""
    train_features = np.asarray(train_features)
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    if len(train_features) < 1 or len(test_labels) < 1:
        raise ValueError(f"kNN needs training and test features; got {len(train_features)} and {len(test_labels)}.")
    num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
    k = min(k, len(train_features))
    hits1 = hits5 = 0
    for start in range(0, len(test_labels), chunk):
        scores = knn_scores(
            train_features,
            train_labels,
            np.asarray(test_features[start : start + chunk]),
            k=k,
            temperature=temperature,
            num_classes=num_classes,
        )
        labels = jnp.asarray(test_labels[start : start + chunk])
        hits1 += int(jnp.sum(topk_hits(scores, labels, 1)))
        hits5 += int(jnp.sum(topk_hits(scores, labels, 5)))
    n = len(test_labels)
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n, "k": k, "temperature": temperature}


@dataclasses.dataclass
class ShardedFeatures:
    """Pooled features and labels of one split, left where the feature extractor put them:
    (T, B, C) and (T, B) global arrays, the batch axis sharded over the mesh's data axis (a
    device holds its rows of every batch). Padding and undecodable examples have label -1."""

    features: jax.Array
    labels: jax.Array

    @property
    def count(self) -> int:
        """Returns the number of real examples."""
        return int(jnp.sum(self.labels >= 0))


def sharded_features(feature_fn, iterator, mesh) -> ShardedFeatures:
    """Returns the pooled features of every batch of an eval iterator, kept sharded over the
    mesh (never gathered onto a host)."""
    features, labels = [], []
    for batch in iterator:
        g = to_global_batch({k: batch[k] for k in ("image", "label", "mask")}, mesh)
        features.append(feature_fn(g["image"])[1])
        labels.append(jnp.where(g["mask"], g["label"], -1))
    if not features:
        raise ValueError("The evaluation split is empty: check the dataset and split names.")
    # Stacking along a new leading axis keeps every device's rows on that device.
    return ShardedFeatures(jnp.stack(features), jnp.stack(labels))


def make_sharded_hits(mesh, *, k: int, temperature: float, num_classes: int):
    """Returns hits(train: ShardedFeatures arrays, queries (B, C), labels (B,)) -> (top-1 hits,
    top-5 hits), jitted: each device ranks its own training rows, only the k best candidates
    per device and query cross the mesh (an all-gather of (D, B, k)), then the global top k vote."""
    axis = sharding.DATA_AXIS

    def local(features, labels, queries):
        t, b, c = features.shape
        top_sims, top_labels = nearest_candidates(features.reshape(t * b, c), labels.reshape(t * b), queries, k)
        gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
        return gather(top_sims), gather(top_labels)

    candidates = jax.shard_map(
        local, mesh=mesh, in_specs=(P(None, axis), P(None, axis), P()), out_specs=P(), check_vma=False
    )

    @jax.jit
    def hits(features, labels, queries, query_labels):
        top_sims, top_labels = candidates(features, labels, queries)  # (B, D * k'), replicated
        best, order = jax.lax.top_k(top_sims, min(k, top_sims.shape[1]))
        votes = weighted_votes(
            best, jnp.take_along_axis(top_labels, order, axis=1), temperature=temperature, num_classes=num_classes
        )
        valid = query_labels >= 0
        return (jnp.sum(topk_hits(votes, query_labels, 1) & valid), jnp.sum(topk_hits(votes, query_labels, 5) & valid))

    return hits


def evaluate_backbone(backbone, evaluation, mesh, *, dataset: str, read) -> dict:
    """Returns kNN results of a backbone (in eval mode) on dataset: features of
    evaluation.train_split are the neighbours, evaluation.split is scored (evaluation: the
    config's eval section; read: the data.ReadOptions of the config's data section).

    The training features stay sharded over the mesh (on N devices each holds 1/N of them);
    each test batch is scored against them where they are, so no host ever holds them all.
    """
    feature_fn = common.make_feature_fn(backbone, mesh)
    splits, num_classes = {}, 0
    for split in (evaluation.train_split, evaluation.split):
        iterator = data_lib.make_eval_iterator(
            dataset,
            split,
            global_batch_size=common.eval_batch_size(evaluation.batch_size, mesh),
            images=data_lib.EvalImages(image_size=evaluation.image_size, resize_size=evaluation.resize_size),
            read=read,
        )
        num_classes = max(num_classes, iterator.num_classes)
        splits[split] = sharded_features(feature_fn, iterator, mesh)
    train, test = splits[evaluation.train_split], splits[evaluation.split]
    k = min(evaluation.knn.k, train.count)
    temperature = evaluation.knn.temperature
    hits = make_sharded_hits(mesh, k=k, temperature=temperature, num_classes=num_classes)
    hits1 = hits5 = 0
    for t in range(test.features.shape[0]):
        h1, h5 = hits(train.features, train.labels, test.features[t], test.labels[t])
        hits1, hits5 = hits1 + int(h1), hits5 + int(h5)
    n = test.count
    return {
        "top1": 100.0 * hits1 / n,
        "top5": 100.0 * hits5 / n,
        "k": k,
        "temperature": temperature,
        "dataset": f"{dataset} ({evaluation.train_split} -> {evaluation.split})",
        "train_examples": train.count,
        "test_examples": n,
    }


def evaluate_config(backbone, config, mesh) -> dict:
    """Returns kNN results of a backbone on the dataset and splits config.eval names."""
    return evaluate_backbone(
        backbone,
        config.eval,
        mesh,
        dataset=common.eval_dataset(config),
        read=data_lib.ReadOptions.from_config(config.data),
    )


def run(config, workdir, weights=None, *, random_init: bool = False, name: str = "knn", check: bool = True) -> dict:
    """Runs weighted kNN on frozen pooled features of config.eval's dataset; returns and writes
    results (check: run the config check first; main.py has run it)."""
    mesh, loaded, _, _ = common.start(config, workdir, weights, "knn", random_init=random_init, check=check)
    results = {**evaluate_config(loaded.backbone, config, mesh), "weights": loaded.description}
    common.write_results(workdir, name, results)
    return results
