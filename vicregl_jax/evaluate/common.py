"""What every evaluation shares: the frozen backbone to evaluate, sharded feature extraction,
and writing results.

Weights come from a pre-training workdir (this project's checkpoints, or weights converted by
`convert from-torch`), from a PyTorch file of the release (backbone or full checkpoint), or
from a fresh random initialisation (the baseline the demo compares against).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from vicregl_jax import data as data_lib
from vicregl_jax import extract as features_lib
from vicregl_jax import state as state_lib
from vicregl_jax import weights as weights_lib
from vicregl_jax.data import to_global_batch
from vicregl_jax.models import create_backbone


def load_backbone(config, workdir: str | None, weights: str | None = None, *, random_init: bool = False):
    """Returns (backbone in eval mode, description) of the weights to evaluate.

    weights: None (the newest checkpoint of workdir), another workdir, a PyTorch file of the
    release (.pth / .safetensors, backbone or full checkpoint, of config.model.arch), or
    "release:NAME" (a published model by name, vicregl_jax.weights).
    random_init: the architecture of config at random initialisation instead.
    """
    arch = config.model.arch
    if random_init:
        backbone = create_backbone(arch, rngs=nnx.Rngs(config.seed), dtype=state_lib.compute_dtype(config.model.dtype))
        backbone.eval()
        return backbone, f"{arch} at random initialisation (seed {config.seed})"
    source = weights or workdir
    if source is None:
        raise ValueError("Nothing to evaluate: pass --workdir of a pre-training run or --weights.")
    if source.startswith(weights_lib.PREFIX):
        backbone, _, description = weights_lib.load_backbone(source, config)
        return backbone, description
    if state_lib.is_release_file(source):
        return state_lib.load_release_backbone(source, config), f"{arch} from the PyTorch file {source}"
    model, saved_config, step = state_lib.load_workdir_model(source)
    if saved_config.model.arch != arch:
        logging.warning("Evaluating %s (arch %s from its config.json), not config.model.arch=%s.",
                        source, saved_config.model.arch, arch)
    return model.backbone, f"{saved_config.model.arch} pre-trained in {source} (step {step})"


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


def eval_batch_size(config, mesh) -> int:
    """Returns config.eval.batch_size rounded down to a multiple of the mesh size (at least one row per device)."""
    return max(mesh.size, config.eval.batch_size // mesh.size * mesh.size)


def check_labelled(config, task: str, splits) -> None:
    """Raises ValueError, before any work, when config.eval's dataset has no labels in one of splits."""
    dataset = eval_dataset(config)
    for split in splits:
        source = data_lib.open_source(dataset, split, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir)
        if source.num_classes == 0:
            raise ValueError(
                f"{task} needs labels, and the dataset {dataset!r} ({split}) has none: set --config.eval.dataset "
                "to a labelled dataset (e.g. imagenet2012, or vicregl_digits for the demo).")


def eval_dataset(config) -> str:
    """Returns the dataset of the image-level evaluations: config.eval.dataset, else the pre-training one."""
    return config.eval.dataset or config.data.dataset


def write_results(workdir, name: str, results: dict[str, Any]) -> None:
    """Writes results as JSON to workdir/eval_<name>.json (host 0) and logs them."""
    logging.info("%s: %s", name, json.dumps(results))
    print(f"[{name}] " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in results.items() if not isinstance(v, (list, dict))), flush=True)
    if jax.process_index() != 0 or workdir is None:
        return
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"eval_{name}.json").write_text(json.dumps(results, indent=2))
