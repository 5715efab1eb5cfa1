"""Orbax checkpoints of the training state: periodic async saves, resume, preemption.

A workdir holds `config.json` (the run's config) and `checkpoints/<step>/` with two items:
`state` (parameters, BatchNorm statistics, optimiser state and step, as plain nested dicts of
arrays) and `meta` (JSON: the model-defining config keys, so that a checkpoint of another
architecture is refused with a clear message before Orbax sees a mismatched tree). The data
position and the random streams are functions of the step, so the step is all that resuming
them needs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

import jax
import orbax.checkpoint as ocp
from etils import epath

# Config keys that define the shapes of the state: a checkpoint written under other values
# cannot be restored into this run.
MODEL_KEYS = ("arch", "mlp", "maps_mlp", "alpha", "num_classes", "optimizer", "layer_scale_init")


def absolute(workdir) -> epath.Path:
    """Returns workdir as an absolute path (Orbax needs one); gs:// and other URLs stay as they are."""
    text = str(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def model_meta(config) -> dict:
    """Returns the model-defining part of the config as a JSON-friendly dict."""
    return {k: config.get(k) for k in MODEL_KEYS}


class Checkpointer:
    """Saves and restores the training state under workdir/checkpoints with Orbax."""

    def __init__(self, workdir, config, *, keep: int = 3, async_save: bool = True):
        self.directory = absolute(workdir) / "checkpoints"
        self.meta = model_meta(config)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """Returns the step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Starts an asynchronous save of state at step (returns before the write ends)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.meta)),
            force=True,
        )

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

    def restore(self, step: int, target):
        """Returns the state at step, laid out (shapes, dtypes, shardings) like target."""
        self.check_compatible(step)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target
        )
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_config(workdir, config) -> None:
    """Writes the run's config as JSON beside the checkpoints (host 0 only)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config_json(workdir) -> dict:
    """Returns the config a run saved in its workdir, as a dict."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a vicregl_jax workdir (run pretraining there first).")
    return json.loads(path.read_text())


class PreemptionWatcher:
    """Tells the training loop when to save and stop: on SIGTERM (Cloud TPU preemption notice,
    SLURM's pre-kill signal) in a single process, or at JAX's preemption sync point across
    hosts, so that every host stops at the same step."""

    def __init__(self, manager: ocp.CheckpointManager | None = None):
        self._flag = threading.Event()
        self._manager = manager
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then stopping.")
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        """Returns True once a preemption notice has arrived (checked at every step)."""
        if self._flag.is_set():
            return True
        if jax.process_count() > 1 and self._manager is not None:
            return bool(self._manager.reached_preemption(step))
        return False

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def read_state(workdir, step: int | None = None) -> tuple[int, dict]:
    """Returns (step, state) of a workdir's checkpoint (the newest by default) as nested dicts
    of arrays on this process's first device, whatever mesh wrote it."""
    directory = absolute(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {directory}: pre-train there first, or pass --weights.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"No checkpoint of step {step} in {directory}; it holds steps {steps}.")
    checkpointer = ocp.StandardCheckpointer()
    path = directory / str(step) / "state"
    metadata = checkpointer.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return step, checkpointer.restore(path, target)
