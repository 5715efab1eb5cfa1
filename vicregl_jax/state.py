"""Model state: the model a config describes, and every save and load of its weights.

This module alone writes and reads weights: training checkpoints (Orbax, as they are: nnx
states, optimiser state, typed arrays), the release's PyTorch files (through layout.py and
torch_io.py), and the export to them.

A workdir holds `config.json` (the run's nested config) and `checkpoints/<step>/` with the
items `model` (parameters and BatchNorm statistics), `train` (step and optimiser state) and
`meta` (JSON: the config keys that define the shapes, so that a checkpoint of another model
is refused with a clear message before Orbax sees a mismatched tree, and a checksum of every
saved array). The data position and
the drop-path randomness are functions of (seed, step), so the step is all that resuming
them needs; no random stream is stored. A workdir written by `convert from-torch` holds the
`model` and `meta` items only.

Every restore verifies: the arrays read must match the checksums written with them (a
position-weighted sum of their bits, computed on the devices at save time) and be finite. A
checkpoint that fails to restore or verify (a truncated or missing file, flipped bytes, a
missing item, an empty step folder) is skipped, with a warning naming it and why, and the
newest one before it is used; when resuming, the skipped ones are moved to
`damaged_checkpoints/` in the workdir so that they neither block later saves nor count
towards `checkpoint.keep`, and rotation never deletes the checkpoint the run last verified.

Checkpoints written before the config was nested (a `state` item of plain dicts) do not load:
convert such a run's weights with an older release of this package, or retrain.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

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
                drop_path_rate=m.drop_path_rate, layer_scale_init=m.layer_scale_init, remat=m.remat,
                unroll_blocks=m.unroll_blocks)


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


def config_history(workdir) -> list[tuple[int, epath.Path]]:
    """Returns (step, path) of the configs a workdir's run was resumed under (config.<step>.json),
    oldest first; config.json, the config it started with, is step 0."""
    root = absolute(workdir)
    found = [(0, root / "config.json")]
    if root.exists():
        for path in root.glob("config.*.json"):
            middle = path.name[len("config."):-len(".json")]
            if middle.isdigit():
                found.append((int(middle), path))
    return sorted(found, key=lambda item: item[0])


def load_config(workdir, step: int | None = None) -> ml_collections.ConfigDict:
    """Returns the config a run saved in its workdir: the one it was last resumed under (at or
    before step, when given), else the one it started with (config.json)."""
    history = config_history(workdir)
    path = history[0][1]
    for at, candidate in history[1:]:
        if step is None or at <= step:
            path = candidate
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


def save_resume_config(workdir, config, step: int) -> epath.Path:
    """Writes the config a run is resumed under at step as config.<step>.json (host 0);
    returns its path."""
    path = absolute(workdir) / f"config.{step}.json"
    if jax.process_index() == 0:
        path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    return path


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


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir restores and verifies, or a state cannot be saved."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint was written for another model (the shape-defining keys differ)."""


class DamagedCheckpointError(RuntimeError):
    """One checkpoint does not restore, or does not match its checksums."""


# --------------------------------------------------------------------------------------------
# Checksums of saved arrays
# --------------------------------------------------------------------------------------------

CHECKSUMS = "checksums"  # the key of the meta item that holds them
DAMAGED_DIR = "damaged_checkpoints"  # where a resumed run moves the checkpoints it skipped


def _leaf_name(path) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":  # nnx.Variable's payload
                parts.append(key.name)
        else:
            parts.append(str(key))
    return "/".join(parts)


def _words(x: jax.Array) -> jax.Array:
    """Returns the bits of x as uint32 words: one per element of a 1-, 2- or 4-byte type."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
    """Returns the row-major position of every element of an array of shape, modulo 2**32."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


@jax.jit
def _digest_leaves(leaves):
    # Per leaf: the sum of its 32-bit words and their sum weighted by 2 * position + 1 (odd,
    # so invertible modulo 2**32: any change of one word changes both), in wrapping uint32
    # arithmetic: exact, so equal on any mesh and sharding; and whether it is finite.
    sums, finite = [], []
    for x in leaves:
        words = _words(x)
        weights = _flat_index(words.shape) * jnp.uint32(2) + jnp.uint32(1)
        sums.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)]))
        finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True))
    return jnp.stack(sums), jnp.stack(finite)


def checksums(tree) -> tuple[dict[str, str], list[str]]:
    """Returns ({leaf name: checksum as hex}, [names of the leaves holding NaN or Inf]) of a
    pytree of (possibly sharded) arrays: one jitted pass over them on their devices."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}, []
    names = [_leaf_name(path) for path, _ in flat]
    sums, finite = jax.device_get(_digest_leaves([leaf for _, leaf in flat]))
    return ({name: f"{int(a):08x}{int(b):08x}" for name, (a, b) in zip(names, sums)},
            [name for name, ok in zip(names, finite) if not ok])


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    if isinstance(error, DamagedCheckpointError):
        return text
    text = text.split(" See full TensorStore details")[0]  # a repr of a bound method follows
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _any_process(failed: bool) -> bool:
    """Returns whether `failed` holds on any process (every process must call it)."""
    if jax.process_count() == 1:
        return failed
    return bool(np.any(multihost_utils.process_allgather(np.int32(failed))))


@dataclasses.dataclass
class _KeepVerified:
    """Orbax preservation policy: preserves the checkpoint this run last verified by restoring it."""

    step: int | None = None

    def should_preserve(self, checkpoints, *, context):
        return [info.step == self.step for info in checkpoints]


class Checkpointer:
    """Saves and restores the training state under workdir/checkpoints with Orbax.

    Saves write a checksum of every array in the meta item; restores verify them and fall
    back to an earlier checkpoint past a damaged one. Rotation keeps the newest `keep`
    checkpoints and, besides, the one this run verified last (the one it resumed from).
    """

    def __init__(self, workdir, meta: dict, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.workdir = absolute(workdir)
        self.directory = self.workdir / "checkpoints"
        self.meta = meta
        self.read_only = read_only
        self.verified = _KeepVerified()
        policy = None if read_only else ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(n=keep), self.verified])
        options = ocp.CheckpointManagerOptions(
            create=not read_only, enable_async_checkpointing=async_save, read_only=read_only,
            preservation_policy=policy, **({"save_interval_steps": 0} if read_only else {}),
        )
        handlers = {"model": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        # Orbax warns that a read-only directory is read only, on every evaluation: asked for, not news.
        orbax_log = logging.getLogger("absl")
        level = orbax_log.level
        orbax_log.setLevel(max(level, logging.ERROR))
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        finally:
            orbax_log.setLevel(level)

    def latest_step(self) -> int | None:
        """Returns the step of the newest checkpoint on disk (not yet verified), or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Returns the steps of the checkpoints on disk, oldest first."""
        return sorted(self.manager.all_steps())

    # ------------------------------------------------------------------------ saving

    def _save(self, step: int, items: dict) -> None:
        meta, digests = dict(self.meta), {}
        for name, tree in items.items():
            digests[name], bad = checksums(tree)
            if bad:
                raise CheckpointError(f"Not saving step {step} to {self.directory}: {', '.join(bad[:3])} hold NaN "
                                      "or Inf; the earlier checkpoints are kept.")
        meta[CHECKSUMS] = digests
        self.manager.save(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardSave(tree) for name, tree in items.items()}, meta=ocp.args.JsonSave(meta),
        ), force=True)

    def save(self, step: int, state: TrainState) -> None:
        """Starts an asynchronous save of state at step (returns before the write ends), its
        checksums computed first on the devices (one pass over the state)."""
        self._save(step, {"model": {"params": state.params, "batch_stats": state.batch_stats},
                          "train": {"step": state.step, "opt_state": state.opt_state}})

    def save_model(self, step: int, params, batch_stats) -> None:
        """Saves the model item alone (weights without a training state) at step."""
        self._save(step, {"model": {"params": params, "batch_stats": batch_stats}})

    # ------------------------------------------------------------------------ restoring

    def read_meta(self, step: int) -> dict:
        """Returns the meta item of the checkpoint at step."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, saved: dict | None = None) -> None:
        """Raises IncompatibleCheckpointError when the checkpoint at step was written for another model."""
        saved = self.read_meta(step) if saved is None else saved
        diff = {k: (saved.get(k), v) for k, v in self.meta.items() if saved.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise IncompatibleCheckpointError(
                f"The checkpoint at {self.directory / str(step)} was written for another model ({listed}). "
                "Use a new --workdir for this config, or run with the config that wrote it."
            )

    def _restore_items(self, step: int, targets: dict) -> tuple[dict, dict]:
        """Returns (meta, {item: tree}) read at step, unverified; raises on any failure."""
        folder = self.directory / str(step)
        if not folder.exists() or not any(folder.iterdir()):
            raise DamagedCheckpointError("the step folder is empty")
        missing = [name for name in ("meta", *targets) if not (folder / name).exists()]
        if missing:
            raise DamagedCheckpointError(f"its {missing[0]!r} item is missing")
        try:
            meta = self.read_meta(step)
        except Exception as error:
            raise DamagedCheckpointError(f"its 'meta' item does not read ({_first_line(error, 120)})") from error
        self.check_compatible(step, meta)
        restored = {}
        for name, tree in targets.items():  # one at a time, to name the one that fails
            try:
                restored[name] = self.manager.restore(
                    step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(tree)}))[name]
            except Exception as error:
                raise DamagedCheckpointError(f"its {name!r} item does not read ({_first_line(error, 120)})") from error
        return meta, restored

    def _verify(self, meta: dict, restored: dict) -> str | None:
        """Returns why restored arrays do not match the checksums saved with them, or None."""
        saved = meta.get(CHECKSUMS) or {}
        for name, tree in restored.items():
            digest, bad = checksums(tree)
            expected = saved.get(name)
            if expected is None:  # written before checksums existed: only finiteness is checked
                logging.info("The %s item has no checksums: restored unverified.", name)
                expected = {}
            differ = [k for k, v in digest.items() if k in expected and expected[k] != v]
            if differ:
                more = f" (and {len(differ) - 1} more arrays)" if len(differ) > 1 else ""
                return f"the data of {name}/{differ[0]} does not match its checksum{more}"
            if bad:
                return f"{name}/{bad[0]} holds NaN or Inf" + (f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else "")
        return None

    def _newest_verified(self, targets, step: int | None = None, verify: bool = True
                         ) -> tuple[int, dict, list[tuple[int, str]]]:
        """Returns (step, {item: tree}, [(skipped step, why)]) of the newest checkpoint (or of
        `step`) that restores and verifies (unless not verify); raises CheckpointError when none does."""
        candidates = sorted(self.all_steps(), reverse=True) if step is None else [step]
        skipped = []
        for candidate in candidates:
            meta, restored, reason = None, None, None
            try:
                meta, restored = self._restore_items(candidate, targets)
            except IncompatibleCheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 (any failure to read makes the checkpoint unusable, not the run)
                reason = _first_line(error)
            # Every process reads its own shards: all agree before the (collective) verification.
            if _any_process(reason is not None) and reason is None:
                reason = "it failed to restore on another process"
            if reason is None and verify:
                reason = self._verify(meta, restored)
            if reason is None:
                if skipped:
                    logging.warning("Restored %s after skipping %s.", self.directory / str(candidate),
                                    "; ".join(f"step {s} ({why})" for s, why in skipped))
                return candidate, restored, skipped
            logging.warning("Skipping the checkpoint %s: %s.", self.directory / str(candidate), reason)
            skipped.append((candidate, reason))
        if not skipped:
            raise FileNotFoundError(f"No checkpoint in {self.directory}: pre-train there first, or pass --weights.")
        listed = "; ".join(f"step {s}: {why}" for s, why in skipped)
        raise CheckpointError(
            f"No checkpoint in {self.directory} restores and verifies ({listed}). Nothing was changed: start "
            f"a new run with another --workdir, or move {self.directory} aside to start this one again.")

    def _move_aside(self, steps) -> None:
        """Moves skipped (damaged) step folders to workdir/damaged_checkpoints (process 0), so
        that a later save of the same step and the rotation do not meet them."""
        if not steps or self.read_only:
            return
        if jax.process_index() == 0:
            root = self.workdir / DAMAGED_DIR
            root.mkdir(parents=True, exist_ok=True)
            for step in steps:
                source = self.directory / str(step)
                if not source.exists():
                    continue
                target, n = root / str(step), 1
                while target.exists():
                    target, n = root / f"{step}.{n}", n + 1
                source.rename(target)
                logging.warning("Moved the damaged checkpoint %s to %s.", source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vicregl_jax.state.move_damaged_checkpoints")
        self.manager.reload()

    def restore(self, like: TrainState, step: int | None = None) -> tuple[int, TrainState, list[tuple[int, str]]]:
        """Returns (step, state, skipped) of the newest checkpoint (or of `step`) that restores
        and verifies, laid out (shapes, dtypes, shardings) like `like`; skipped lists the
        newer checkpoints passed over, with why, which are moved to workdir/damaged_checkpoints
        (unless read-only)."""
        steps = self.all_steps()
        if steps and not any((self.directory / str(s) / "train").exists() for s in steps):
            raise ValueError(
                f"{self.directory} holds weights without a training state (converted or exported weights): "
                f"start a new run from them with --config.model.init_weights={self.workdir} and another --workdir.")
        targets = {"model": abstract_like({"params": like.params, "batch_stats": like.batch_stats}),
                   "train": abstract_like({"step": like.step, "opt_state": like.opt_state})}
        found, restored, skipped = self._newest_verified(targets, step)
        self.verified.step = found
        self._move_aside([s for s, _ in skipped])
        model, train = restored["model"], restored["train"]
        return found, TrainState(train["step"], model["params"], model["batch_stats"], train["opt_state"]), skipped

    def restore_model(self, params_like, batch_stats_like, step: int | None = None, *, verify: bool = True):
        """Returns (step, params, batch_stats, skipped) of the newest checkpoint (or of `step`)
        whose model item restores and verifies, laid out like the given (abstract) states.
        verify=False skips the checksums (a compiled pass, slow to compile for a large tree), for
        callers that check the files' bytes themselves (vicregl_jax.weights)."""
        targets = {"model": {"params": params_like, "batch_stats": batch_stats_like}}
        found, restored, skipped = self._newest_verified(targets, step, verify)
        return found, restored["model"]["params"], restored["model"]["batch_stats"], skipped

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _on(sharding):
    return lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def describe_skipped(skipped) -> str:
    """Returns "skipped step 5 (why); ..." for the checkpoints a restore passed over, or ""."""
    return "; ".join(f"skipped step {s} ({why})" for s, why in skipped)


def load_workdir_model(workdir, step: int | None = None, *, sharding=None) -> tuple[VICRegLModel, Any, int]:
    """Returns (model in eval mode, config, step) of a workdir's checkpoint: the newest that
    restores and verifies by default (damaged newer ones are skipped with a warning), its
    arrays on `sharding` (this process's first device by default)."""
    config = load_config(workdir, step)
    checkpointer = Checkpointer(workdir, model_meta(config), read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: pre-train there first, or pass --weights.")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"No checkpoint of step {step} in {checkpointer.directory}; it holds steps {steps}.")
    model = abstract_model(config)
    graphdef, params, batch_stats, rest = split_model(model)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        step, params, batch_stats, skipped = checkpointer.restore_model(
            jax.tree.map(_on(sharding), params), jax.tree.map(_on(sharding), batch_stats), step)
    finally:
        checkpointer.close()
    if skipped:
        print(f"{workdir}: using the checkpoint of step {step}; {describe_skipped(skipped)}.", flush=True)
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
    if not checkpointer.all_steps():
        checkpointer.close()
        raise FileNotFoundError(f"config.model.init_weights={path!r} holds no checkpoint.")
    try:
        step, params, batch_stats, skipped = checkpointer.restore_model(abstract_like(params), abstract_like(batch_stats))
    finally:
        checkpointer.close()
    skipped_text = f"; {describe_skipped(skipped)}" if skipped else ""
    return params, batch_stats, f"{path} (step {step}{skipped_text})"

