"""What every evaluation shares: the frozen backbone to evaluate, sharded feature extraction,
and writing results.

Weights come from a pre-training workdir (this project's checkpoints), from a PyTorch file of
the release (backbone or full checkpoint, through vicregl_jax.convert), or from a fresh random
initialisation (the baseline the demo compares against).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from vicregl_jax import convert, sharding
from vicregl_jax.data import to_global_batch
from vicregl_jax.models import create_backbone

def load_backbone(config, workdir: str | None, weights: str | None = None, *, random_init: bool = False):
    """Returns (backbone in eval mode, description) of the weights to evaluate.

    weights: None (the newest checkpoint of workdir), another pre-training workdir, or a
    PyTorch file of the release (.pth / .safetensors, backbone or full checkpoint).
    random_init: the architecture of config at random initialisation instead.
    """
    from vicregl_jax import train

    if random_init:
        backbone = create_backbone(config.arch, rngs=nnx.Rngs(config.seed), dtype=train.compute_dtype(config))
        backbone.eval()
        return backbone, f"{config.arch} at random initialisation (seed {config.seed})"
    source = weights or workdir
    if source is None:
        raise ValueError("Nothing to evaluate: pass --workdir of a pre-training run or --weights.")
    if str(source).endswith(convert.TORCH_SUFFIXES):
        if not os.path.exists(source):
            raise FileNotFoundError(f"--weights={source} does not exist.")
        backbone = create_backbone(config.arch, rngs=nnx.Rngs(0), dtype=train.compute_dtype(config))
        convert.load_torch_state_dict(backbone, convert.read_torch_weights(source))
        backbone.eval()
        return backbone, f"{config.arch} from the PyTorch file {source}"
    model, saved_config, step = train.load_model(source)
    if saved_config.arch != config.arch:
        logging.warning("Evaluating %s (arch %s from its config.json), not config.arch=%s.",
                        source, saved_config.arch, config.arch)
    return model.backbone, f"{saved_config.arch} pre-trained in {source} (step {step})"


def make_feature_fn(backbone, mesh):
    """Returns features(images) -> (maps (B, N, C), pooled (B, C)) float32, jitted over the mesh."""
    graphdef, state = nnx.split(backbone)

    @jax.jit
    def features(state, images):
        net = nnx.merge(graphdef, state, copy=True)
        maps, pooled = net(images)
        return maps.astype(jnp.float32), pooled.astype(jnp.float32)

    replicated_state = jax.device_put(state, sharding.replicated(mesh))
    return lambda images: features(replicated_state, images)


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
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def eval_batch_size(config, mesh) -> int:
    """Returns config.eval_batch_size rounded down to a multiple of the mesh size (at least one row per device)."""
    return max(mesh.size, config.eval_batch_size // mesh.size * mesh.size)


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
