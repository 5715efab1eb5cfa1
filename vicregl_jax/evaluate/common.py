"""What every evaluation shares: the frozen backbone to evaluate, sharded feature extraction,
and writing results.

Weights come from a pre-training workdir (this project's checkpoints, or weights converted by
`convert from-torch`), from a PyTorch file of the release (backbone or full checkpoint), or
from a fresh random initialisation (the baseline the demo compares against).
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from vicregl_jax import build, release, sharding
from vicregl_jax import extract as features_lib
from vicregl_jax import weights as weights_lib
from vicregl_jax.data import to_global_batch
from vicregl_jax.model_config import compute_dtype
from vicregl_jax.models import create_backbone


class Evaluation(NamedTuple):
    """What an image-level evaluation starts from: the mesh, the backbone (LoadedBackbone),
    its jitted feature function (make_feature_fn) and the evaluation batch over the mesh."""

    mesh: Any
    loaded: LoadedBackbone
    features: Any
    batch_size: int


def start(config, workdir, weights, mode: str, *, random_init: bool, check: bool) -> Evaluation:
    """Returns the Evaluation of `mode` ("knn", "linear", "correspond") on the backbone to
    evaluate, after the run's config check when check is set (main.py has run it otherwise)."""
    if check:
        build.check_config(config, mode, workdir=workdir)
    mesh = sharding.make_mesh(config.mesh.num_devices)
    loaded = load_backbone(config, workdir, weights, random_init=random_init)
    return Evaluation(
        mesh, loaded, make_feature_fn(loaded.backbone, mesh), eval_batch_size(config.eval.batch_size, mesh)
    )


class LoadedBackbone(NamedTuple):
    """A backbone to evaluate (in eval mode), what its weights are, and its architecture."""

    backbone: nnx.Module
    description: str
    arch: str


def load_backbone(
    config, workdir: str | None, weights: str | None = None, *, random_init: bool = False
) -> LoadedBackbone:
    """Returns the backbone to evaluate, its description and its architecture.

    weights: None (the newest checkpoint of workdir), another workdir, a PyTorch file of the
    release (.pth / .safetensors, backbone or full checkpoint, of config.model.arch), or
    "release:NAME" (a published model by name, vicregl_jax.weights).
    random_init: the architecture of config at random initialisation instead. Wherever the
    weights come from, the compute settings (model.dtype, model.remat, model.unroll_blocks)
    are config's; the architecture of a workdir or a named model is its own.
    """
    model, arch = config.model, config.model.arch
    if random_init:
        backbone = create_backbone(
            arch,
            rngs=nnx.Rngs(config.seed),
            dtype=compute_dtype(model.dtype),
            remat=model.remat,
            unroll=model.unroll_blocks,
        )
        backbone.eval()
        return LoadedBackbone(backbone, f"{arch} at random initialisation (seed {config.seed})", arch)
    source = weights or workdir
    if source is None:
        raise ValueError("Nothing to evaluate: pass --workdir of a pre-training run or --weights.")
    if source.startswith(weights_lib.PREFIX):
        backbone, saved, description = weights_lib.load_backbone(source, config)
        return LoadedBackbone(backbone, description, saved.model.arch)
    if release.is_release_file(source):
        return LoadedBackbone(
            release.load_release_backbone(source, model, config.seed), f"{arch} from the PyTorch file {source}", arch
        )
    loaded, saved_config, step = release.load_workdir_model(source, compute=model)
    saved_arch = saved_config.model.arch
    if saved_arch != arch:
        logging.warning(
            "Evaluating %s (arch %s from its config.json), not config.model.arch=%s.", source, saved_arch, arch
        )
    return LoadedBackbone(loaded.backbone, f"{saved_arch} pre-trained in {source} (step {step})", saved_arch)


def make_feature_fn(backbone, mesh):
    """Returns features(images) -> (maps (B, N, C), pooled (B, C)) float32, jitted over the mesh:
    vicregl_jax.extract's function, on the images the pipeline has normalised."""
    return features_lib.Extractor(backbone, mesh=mesh).normalised


def extract_features(feature_fn, iterator, mesh, *, keep_maps: bool = False) -> dict[str, np.ndarray]:
    """Returns pooled features, labels (and maps) of every real example of an eval iterator,
    gathered from all hosts onto every host."""
    pooled, labels, maps = [], [], []
    for batch in iterator:
        global_batch = to_global_batch({k: batch[k] for k in ("image", "label", "mask")}, mesh)
        m, p = feature_fn(global_batch["image"])
        valid = fetch(global_batch["mask"]).astype(bool)
        pooled.append(fetch(p)[valid])
        labels.append(fetch(global_batch["label"])[valid])
        if keep_maps:
            maps.append(fetch(m)[valid])
    if not pooled:
        raise ValueError("The evaluation split is empty: check the dataset and split names.")
    out = {"features": np.concatenate(pooled), "labels": np.concatenate(labels)}
    if keep_maps:
        out["maps"] = np.concatenate(maps)
    return out


def fetch(x: jax.Array) -> np.ndarray:
    """Returns a global array whole on this host (gathered across hosts when there are several)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def eval_batch_size(batch_size: int, mesh) -> int:
    """Returns batch_size (config.eval.batch_size) rounded down to a multiple of the mesh size
    (at least one row per device)."""
    return max(mesh.size, batch_size // mesh.size * mesh.size)


def eval_dataset(config) -> str:
    """Returns the dataset of the image-level evaluations: config.eval.dataset, else the pre-training one."""
    return config.eval.dataset or config.data.dataset


def write_results(workdir, name: str, results: dict[str, Any]) -> None:
    """Writes results as JSON to workdir/eval_<name>.json (host 0) and logs them."""
    logging.info("%s: %s", name, json.dumps(results))
    print(
        f"[{name}] "
        + ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in results.items()
            if not isinstance(v, (list, dict))
        ),
        flush=True,
    )
    if jax.process_index() != 0 or workdir is None:
        return
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"eval_{name}.json").write_text(json.dumps(results, indent=2))
