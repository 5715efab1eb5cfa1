"""Model state: the model a config describes, and every save and load of its weights.

This module alone writes and reads weights: training checkpoints (Orbax, as they are: nnx
states, optimiser state, typed arrays), the release's PyTorch files (through layout.py and
torch_io.py), and the export to them.

A workdir holds `config.json` (the run's nested config) and `checkpoints/<step>/` with the
items `model` (parameters and BatchNorm statistics), `train` (step and optimiser state) and
`meta` (JSON: the config keys that define the shapes, so that a checkpoint of another model
is refused with a clear message before Orbax sees a mismatched tree). The data position and
the drop-path randomness are functions of (seed, step), so the step is all that resuming
them needs; no random stream is stored. A workdir written by `convert from-torch` holds the
`model` and `meta` items only.

Checkpoints written before the config was nested (a `state` item of plain dicts) do not load:
convert such a run's weights with an older release of this package, or retrain.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from vicregl_jax import config as config_lib
from vicregl_jax import layout, torch_io
from vicregl_jax.models.vicregl import VICRegLModel

# The config keys that define the shapes of the state: a checkpoint written under other
# values cannot be restored into this run.
MODEL_KEYS = ("model.arch", "model.mlp", "model.maps_mlp", "model.num_classes", "model.layer_scale_init",
              "loss.alpha", "optim.name")


# --------------------------------------------------------------------------------------------
# The model of a config
# --------------------------------------------------------------------------------------------


def compute_dtype(name: str) -> jnp.dtype:
    """Returns the compute dtype of config.model.dtype: for "auto", bfloat16 on GPU / TPU and
    float32 on CPU."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype={name!r}: use 'auto', 'float32' or 'bfloat16'.")
    return jnp.dtype(name)


def model_kwargs(config) -> dict:
    """Returns the VICRegLModel keyword arguments of a config (model subtree and loss.alpha)."""
    m = config.model
    return dict(arch=m.arch, mlp=m.mlp, maps_mlp=m.maps_mlp, alpha=config.loss.alpha,
                num_classes=m.num_classes, dtype=compute_dtype(m.dtype),
                drop_path_rate=m.drop_path_rate, layer_scale_init=m.layer_scale_init)


def create_model(config, *, rngs: nnx.Rngs) -> VICRegLModel:
    """Returns the VICRegL model (backbone + heads) the config describes, in train mode."""
    model = VICRegLModel(**model_kwargs(config), rngs=rngs)
    model.train()
    return model


def abstract_model(config) -> VICRegLModel:
    """Returns the config's model built with nnx.eval_shape: shapes only, nothing allocated."""
    return nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(config.seed)))


def split_model(model: nnx.Module):
    """Returns (graphdef, params, batch_stats, rest): rest holds the drop-path random streams."""
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def seed_random_streams(model: nnx.Module, key: jax.Array) -> None:
    """Gives the model's random streams (drop path) fresh keys derived from key, in place."""
    nnx.reseed(model, default=key)


def model_meta(config) -> dict:
    """Returns the shape-defining part of the config as a JSON-friendly dict."""
    out = {}
    for dotted in MODEL_KEYS:
        value = config
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, (dict, ml_collections.ConfigDict)) else None
        out[dotted] = value
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training; the graph definition stays outside."""

    step: jax.Array
    params: Any  # nnx.State of the nnx.Param variables
    batch_stats: Any  # nnx.State of the BatchNorm running statistics
    opt_state: Any


def abstract_like(tree):
    """Returns ShapeDtypeStructs (with the arrays' shardings) of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


# --------------------------------------------------------------------------------------------
# Workdirs: config.json and Orbax checkpoints
# --------------------------------------------------------------------------------------------


def absolute(workdir) -> epath.Path:
    """Returns workdir as an absolute path (Orbax needs one); gs:// and other URLs stay as they are."""
    text = str(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def save_config(workdir, config) -> None:
    """Writes the run's config as JSON in the workdir (host 0 only)."""
    if jax.process_index() != 0:
        return
    path = absolute(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir) -> ml_collections.ConfigDict:
    """Returns the config a run saved in its workdir."""
    path = absolute(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a vicregl_jax workdir "
                                "(pre-train there first, or convert release weights with `convert from-torch`).")
    saved = json.loads(path.read_text())
    if "model" not in saved:
        raise ValueError(f"{path} is the config of an earlier version of vicregl_jax (flat keys, no 'model' "
                         "section): its checkpoints do not load in this version; retrain, or export the weights "
                         "to PyTorch with the earlier version and convert them back with `convert from-torch`.")
    config = config_lib.default_config()
    config.update_from_flattened_dict(_flatten(saved))
    return config


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = tuple(map(_tuples, value)) if isinstance(value, list) else value
    return out


def _tuples(value):
    return tuple(map(_tuples, value)) if isinstance(value, list) else value


class Checkpointer:
    """Saves and restores the training state under workdir/checkpoints with Orbax."""

    def __init__(self, workdir, meta: dict, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = absolute(workdir) / "checkpoints"
        self.meta = meta
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save, read_only=read_only,
        )
        handlers = {"model": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """Returns the step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Returns the steps of the complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState) -> None:
        """Starts an asynchronous save of state at step (returns before the write ends)."""
        self.manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave(self.meta),
        ), force=True)

    def save_model(self, step: int, params, batch_stats) -> None:
        """Saves the model item alone (weights without a training state) at step."""
        self.manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave({"params": params, "batch_stats": batch_stats}),
            meta=ocp.args.JsonSave(self.meta),
        ), force=True)

    def check_compatible(self, step: int) -> None:
        """Raises ValueError when the checkpoint at step was written for another model."""
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        diff = {k: (saved.get(k), v) for k, v in self.meta.items() if saved.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"The checkpoint at {self.directory / str(step)} was written for another model ({listed}). "
                "Use a new --workdir for this config, or run with the config that wrote it."
            )

    def restore(self, step: int, like: TrainState) -> TrainState:
        """Returns the state at step, laid out (shapes, dtypes, shardings) like `like`."""
        self.check_compatible(step)
        if not (self.directory / str(step) / "train").exists():
            raise ValueError(
                f"{self.directory / str(step)} holds weights without a training state (converted or "
                "exported weights): start a new run from them with --config.model.init_weights="
                f"{self.directory.parent} and another --workdir.")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(abstract_like({"params": like.params, "batch_stats": like.batch_stats})),
            train=ocp.args.StandardRestore(abstract_like({"step": like.step, "opt_state": like.opt_state})),
        ))
        model, train = restored["model"], restored["train"]
        return TrainState(train["step"], model["params"], model["batch_stats"], train["opt_state"])

    def restore_model(self, step: int, params_like, batch_stats_like):
        """Returns (params, batch_stats) at step, laid out like the given (abstract) states."""
        self.check_compatible(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore({"params": params_like, "batch_stats": batch_stats_like}),
        ))["model"]
        return restored["params"], restored["batch_stats"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _on(sharding):
    return lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def load_workdir_model(workdir, step: int | None = None, *, sharding=None) -> tuple[VICRegLModel, Any, int]:
    """Returns (model in eval mode, config, step) of a workdir's checkpoint (the newest by
    default), its arrays on `sharding` (this process's first device by default)."""
    config = load_config(workdir)
    checkpointer = Checkpointer(workdir, model_meta(config), read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: pre-train there first, or pass --weights.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"No checkpoint of step {step} in {checkpointer.directory}; it holds steps {steps}.")
    model = abstract_model(config)
    graphdef, params, batch_stats, rest = split_model(model)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params, batch_stats = checkpointer.restore_model(
        step, jax.tree.map(_on(sharding), params), jax.tree.map(_on(sharding), batch_stats))
    checkpointer.close()
    model = nnx.merge(graphdef, params, batch_stats, rest)
    seed_random_streams(model, jax.random.key(config.seed))
    model.eval()
    return model, config, step


def is_workdir(path) -> bool:
    """Returns whether path holds a config.json (a pre-training or converted workdir)."""
    return (absolute(path) / "config.json").exists()


# --------------------------------------------------------------------------------------------
# The release's PyTorch files
# --------------------------------------------------------------------------------------------


def is_release_file(path) -> bool:
    """Returns whether path names a PyTorch weights file (.pth / .pt / .safetensors)."""
    return str(path).endswith(torch_io.TORCH_SUFFIXES)


def load_release_backbone(path, config) -> nnx.Module:
    """Returns config.model.arch's backbone holding the weights of a release file (backbone
    file or full checkpoint), in eval mode."""
    model = abstract_model(config).backbone
    layout.load_torch_state_dict(model, torch_io.read_torch_weights(str(path)))
    seed_random_streams(model, jax.random.key(config.seed))
    model.eval()
    return model


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
    model = abstract_model(config)
    parts = layout.load_torch_state_dict(model, state_dict)  # raises before any costly init
    if set(parts) != {p for p in layout.PARTS if getattr(model, p, None) is not None}:
        model = nnx.jit(lambda: create_model(config, rngs=nnx.Rngs(config.seed)))()
        layout.load_torch_state_dict(model, state_dict)
    seed_random_streams(model, jax.random.key(config.seed))
    model.eval()
    return model, parts


def write_workdir(model: VICRegLModel, config, workdir, *, step: int = 0) -> None:
    """Writes a workdir holding the model's weights (no training state): config.json and a
    checkpoint with the model item, readable by every evaluation and as init_weights."""
    save_config(workdir, config)
    _, params, batch_stats, _ = split_model(model)
    checkpointer = Checkpointer(workdir, model_meta(config), async_save=False)
    checkpointer.save_model(step, params, batch_stats)
    checkpointer.close()


def export_release_files(model: VICRegLModel, out: str, *, full: bool, epoch: int = 0,
                         safetensors: bool = False) -> list[str]:
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
        model = abstract_model(config)
        parts = layout.load_torch_state_dict(model, torch_io.read_torch_weights(path))
        _, loaded_params, loaded_stats, _ = split_model(model)
        keep = lambda new, old: old if isinstance(new, jax.ShapeDtypeStruct) else _place(new, old)  # noqa: E731
        return (jax.tree.map(keep, loaded_params, params), jax.tree.map(keep, loaded_stats, batch_stats),
                f"{path} ({', '.join(parts)})")
    if not is_workdir(path):
        raise FileNotFoundError(f"config.model.init_weights={path!r} is neither a weights file "
                                f"({', '.join(torch_io.TORCH_SUFFIXES)}) nor a workdir with a config.json.")
    source = load_config(path)
    mismatch = {k: (v, model_meta(config)[k]) for k, v in model_meta(source).items()
                if k != "optim.name" and model_meta(config)[k] != v}
    if mismatch:
        listed = ", ".join(f"{k}: {a!r} there vs {b!r} here" for k, (a, b) in mismatch.items())
        raise ValueError(f"config.model.init_weights={path!r} holds another model ({listed}); "
                         "use a workdir of the same arch and heads.")
    checkpointer = Checkpointer(path, model_meta(source), read_only=True)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"config.model.init_weights={path!r} holds no checkpoint.")
    params, batch_stats = checkpointer.restore_model(step, abstract_like(params), abstract_like(batch_stats))
    checkpointer.close()
    return params, batch_stats, f"{path} (step {step})"

