"""Weights that come from or go outside a run: the release's PyTorch files (through layout.py
and torch_io.py), a workdir's newest verified weights, a run's initial weights, and the
workdir that `convert from-torch` writes.

An evaluation takes the weights from where they are and the compute settings (model.dtype,
model.remat, model.unroll_blocks) from its own config: `load_workdir_model(..., compute=)`.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from vicregl_jax import config as config_lib
from vicregl_jax import layout, torch_io
from vicregl_jax import workdir as workdir_lib
from vicregl_jax.checkpoint import Checkpointer, abstract_like, describe_skipped
from vicregl_jax.model_config import (
    abstract_model,
    create_model,
    model_meta,
    seed_random_streams,
    split_model,
    with_compute,
)
from vicregl_jax.models.vicregl import VICRegLModel


def _on(sharding):
    return lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def load_workdir_model(
    workdir, step: int | None = None, *, sharding=None, compute: ml_collections.ConfigDict | None = None
) -> tuple[VICRegLModel, Any, int]:
    """Returns (model in eval mode, config, step) of a workdir's checkpoint: the newest that
    restores and verifies by default (damaged newer ones are skipped with a warning), its
    arrays on `sharding` (this process's first device by default).

    compute: a config's model section whose compute settings (dtype, remat, unroll_blocks)
    the model takes instead of those the workdir was trained with; the returned config says
    what the model is.
    """
    config = workdir_lib.load_config(workdir, step)
    config.model = with_compute(config.model, compute)
    checkpointer = Checkpointer(workdir, model_meta(config), read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: pre-train there first, or pass --weights.")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"No checkpoint of step {step} in {checkpointer.directory}; it holds steps {steps}.")
    model = abstract_model(config.model, config.loss.alpha, config.seed)
    graphdef, params, batch_stats, rest = split_model(model)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        step, params, batch_stats, skipped = checkpointer.restore_model(
            jax.tree.map(_on(sharding), params), jax.tree.map(_on(sharding), batch_stats), step
        )
    finally:
        checkpointer.close()
    if skipped:
        print(f"{workdir}: using the checkpoint of step {step}; {describe_skipped(skipped)}.", flush=True)
    model = nnx.merge(graphdef, params, batch_stats, rest)
    seed_random_streams(model, jax.random.key(config.seed))
    model.eval()
    return model, config, step


# --------------------------------------------------------------------------------------------
# The release's PyTorch files
# --------------------------------------------------------------------------------------------


def is_release_file(path) -> bool:
    """Returns whether path names a PyTorch weights file (.pth / .pt / .safetensors)."""
    return str(path).endswith(torch_io.TORCH_SUFFIXES)


def load_release_backbone(path, model: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
    """Returns the model section's backbone (model.arch, its compute settings) holding the
    weights of a release file (backbone file or full checkpoint), in eval mode."""
    # alpha 1: no local projector to build; only the backbone is kept.
    backbone = abstract_model(model, 1.0, seed).backbone
    layout.load_torch_state_dict(backbone, torch_io.read_torch_weights(str(path)))
    seed_random_streams(backbone, jax.random.key(seed))
    backbone.eval()
    return backbone


def converted_config(state_dict, arch: str, **overrides) -> ml_collections.ConfigDict:
    """Returns the config of a model holding release weights: the heads and classifier read
    off a full checkpoint's shapes (alpha only as 0, 1 or 0.75 for in between), the given
    keys (model.* and loss.alpha, dotted) over them."""
    config = config_lib.default_config()
    config.model.arch = arch
    if layout.is_full_layout(layout.strip_ddp_prefix(state_dict)):
        inferred = layout.infer_model_kwargs(state_dict)
        config.model.mlp, config.model.maps_mlp = inferred["mlp"], inferred["maps_mlp"]
        config.model.num_classes = inferred["num_classes"]
        config.loss.alpha = inferred["alpha"]
        if "layer_scale_init" in inferred:
            config.model.layer_scale_init = inferred["layer_scale_init"]
    config.update_from_flattened_dict({k: v for k, v in overrides.items() if v is not None})
    return config


def model_from_release(state_dict, config) -> tuple[VICRegLModel, tuple[str, ...]]:
    """Returns (the config's model holding the release weights, the parts loaded).

    From a full checkpoint every weight comes from the file and nothing is randomly
    initialised (the model is built abstractly: fast even for the largest); from a backbone
    file the heads are initialised from config.seed.
    """
    model = abstract_model(config.model, config.loss.alpha, config.seed)
    parts = layout.load_torch_state_dict(model, state_dict)  # raises before any costly init
    if set(parts) != {p for p in layout.PARTS if getattr(model, p, None) is not None}:
        model = nnx.jit(lambda: create_model(config.model, config.loss.alpha, rngs=nnx.Rngs(config.seed)))()
        layout.load_torch_state_dict(model, state_dict)
    seed_random_streams(model, jax.random.key(config.seed))
    model.eval()
    return model, parts


def write_workdir(model: VICRegLModel, config, workdir, *, step: int = 0) -> None:
    """Writes a workdir holding the model's weights (no training state): config.json and a
    checkpoint with the model item, readable by every evaluation and as init_weights."""
    workdir_lib.save_config(workdir, config)
    _, params, batch_stats, _ = split_model(model)
    checkpointer = Checkpointer(workdir, model_meta(config), async_save=False)
    checkpointer.save_model(step, params, batch_stats)
    checkpointer.close()


def export_release_files(
    model: VICRegLModel, out: str, *, full: bool, epoch: int = 0, safetensors: bool = False
) -> list[str]:
    """Writes the model as the release's backbone file (full=False, loads with strict=True
    into its resnet / convnext) or full checkpoint {"epoch", "model": module.*}; returns the
    paths written."""
    state_dict = layout.to_torch_state_dict(model, model.arch, full=full)
    return torch_io.write_torch_weights(state_dict, out, epoch=epoch if full else None, safetensors=safetensors)


# --------------------------------------------------------------------------------------------
# Initial weights of a run
# --------------------------------------------------------------------------------------------


def _place(value, like):
    """Returns value as a global array with like's sharding (built shard by shard from host
    memory, so that arrays spanning hosts are never gathered)."""
    value = np.asarray(value, like.dtype)
    if value.shape != like.shape:
        raise ValueError(f"shape {value.shape} where the model has {like.shape}")
    return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])


def initial_weights(path, config, params, batch_stats) -> tuple[Any, Any, str]:
    """Returns (params, batch_stats, description) with the weights of `path` loaded, placed
    like the given (sharded) states: a release file (backbone file: the heads keep their
    values; full checkpoint: everything) or a workdir of the same model."""
    path = str(path)
    if is_release_file(path):
        model = abstract_model(config.model, config.loss.alpha, config.seed)
        parts = layout.load_torch_state_dict(model, torch_io.read_torch_weights(path))
        _, loaded_params, loaded_stats, _ = split_model(model)
        keep = lambda new, old: old if isinstance(new, jax.ShapeDtypeStruct) else _place(new, old)  # noqa: E731
        return (
            jax.tree.map(keep, loaded_params, params),
            jax.tree.map(keep, loaded_stats, batch_stats),
            f"{path} ({', '.join(parts)})",
        )
    if not workdir_lib.is_workdir(path):
        raise FileNotFoundError(
            f"config.model.init_weights={path!r} is neither a weights file "
            f"({', '.join(torch_io.TORCH_SUFFIXES)}) nor a workdir with a config.json."
        )
    source = workdir_lib.load_config(path)
    mismatch = {
        k: (v, model_meta(config)[k])
        for k, v in model_meta(source).items()
        if k != "optim.name" and model_meta(config)[k] != v
    }
    if mismatch:
        listed = ", ".join(f"{k}: {a!r} there vs {b!r} here" for k, (a, b) in mismatch.items())
        raise ValueError(
            f"config.model.init_weights={path!r} holds another model ({listed}); "
            "use a workdir of the same arch and heads."
        )
    checkpointer = Checkpointer(path, model_meta(source), read_only=True)
    if not checkpointer.all_steps():
        checkpointer.close()
        raise FileNotFoundError(f"config.model.init_weights={path!r} holds no checkpoint.")
    try:
        step, params, batch_stats, skipped = checkpointer.restore_model(
            abstract_like(params), abstract_like(batch_stats)
        )
    finally:
        checkpointer.close()
    skipped_text = f"; {describe_skipped(skipped)}" if skipped else ""
    return params, batch_stats, f"{path} (step {step}{skipped_text})"
