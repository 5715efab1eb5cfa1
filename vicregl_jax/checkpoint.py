"""Checkpoints: Orbax saves and restores of a run's state under one folder of its workdir,
verified on every restore.

Pre-training writes `checkpoints/<step>/` with the items `model` (parameters and BatchNorm
statistics), `train` (step and optimiser state) and `meta` (JSON: the config keys that define
the shapes, so that a checkpoint of another model is refused with a clear message before
Orbax sees a mismatched tree, and a checksum of every saved array). A workdir written by
`convert from-torch` holds the `model` and `meta` items only. An evaluation's head writes
`<name>_head/<step>/` with the items `head` and `meta` (its settings, and notes such as the
scores so far). The data position and the drop-path or dropout randomness are functions of
(seed, step), so the step is all that resuming them needs; no random stream is stored.

Every restore verifies: the arrays read must match the checksums written with them (a
position-weighted sum of their bits, computed on the devices at save time) and be finite. A
checkpoint that fails to restore or verify (a truncated or missing file, flipped bytes, a
missing item, an empty step folder) is skipped, with a warning naming it and why, and the
newest one before it is used; when resuming, the skipped ones are moved to
`damaged_checkpoints/` in the workdir so that they neither block later saves nor count
towards `keep`, and rotation never deletes the checkpoint the run last verified.

Checkpoints written before the config was nested (a `state` item of plain dicts) do not load:
convert such a run's weights with an older release of this package, or retrain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vicregl_jax import library_logs
from vicregl_jax.checksums import checksums
from vicregl_jax.workdir import absolute

library_logs.install()  # not the libraries' tracebacks around a damaged checkpoint: our one line


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


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir restores and verifies, or a state cannot be saved."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint was written for another model (the shape-defining keys differ)."""


class DamagedCheckpointError(RuntimeError):
    """One checkpoint does not restore, or does not match its checksums."""


# --------------------------------------------------------------------------------------------
# The meta item, and where damaged checkpoints go
# --------------------------------------------------------------------------------------------

CHECKSUMS = "checksums"  # the key of the meta item that holds them
NOTES = "notes"  # the key of the meta item that holds a save's notes
DAMAGED_DIR = "damaged_checkpoints"  # where a resumed run moves the checkpoints it skipped


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    if isinstance(error, DamagedCheckpointError):
        return text
    text = text.split(" See full TensorStore details")[0]  # a repr of a bound method follows
    text = text if len(text) <= limit else text[: limit - 3] + "..."
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


# The error of a checkpoint written under other settings, by the kind of its folder.
MISMATCH = {
    "checkpoints": "The checkpoint at {where} was written for another model ({listed}). Use a new --workdir "
    "for this config, or run with the config that wrote it.",
    "head": "The head checkpoint at {where} was written by another evaluation ({listed}): delete that folder "
    "or evaluate under another name.",
}


class Checkpointer:
    """Saves and restores a run's state under workdir/<folder> with Orbax.

    items: the names of the array items each checkpoint holds (besides the JSON `meta`).
    Saves write a checksum of every array in the meta item; restores verify them and fall
    back to an earlier checkpoint past a damaged one. Rotation keeps the newest `keep`
    checkpoints and, besides, the one this run verified last (the one it resumed from).
    meta: what the checkpoints must have been written under (JSON values): a checkpoint
    whose meta differs in one of these keys is refused, naming the key.
    """

    def __init__(
        self,
        workdir,
        meta: dict,
        *,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
        folder: str = "checkpoints",
        items: Sequence[str] = ("model", "train"),
    ):
        self.workdir = absolute(workdir)
        self.directory = self.workdir / folder
        self.damaged = self.workdir / DAMAGED_DIR / ("" if folder == "checkpoints" else folder)
        self.mismatch = MISMATCH["checkpoints" if folder == "checkpoints" else "head"]
        self.meta = json.loads(json.dumps(meta))  # as JSON gives it back: tuples -> lists
        self.read_only = read_only
        self.pending = None  # the step of the save in flight, if any
        self.verified = _KeepVerified()
        policy = (
            None
            if read_only
            else ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(n=keep), self.verified])
        )
        options = ocp.CheckpointManagerOptions(
            create=not read_only,
            # A save that failed part-way leaves an unfinished step folder: removed on resuming,
            # or the next save of that step would find it there and fail.
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            preservation_policy=policy,
            **({"save_interval_steps": 0} if read_only else {}),
        )
        handlers = {**{name: ocp.StandardCheckpointHandler() for name in items}, "meta": ocp.JsonCheckpointHandler()}
        # Orbax warns that a read-only directory is read only, on every evaluation: asked for, not news.
        orbax_log = logging.getLogger("absl")
        level = orbax_log.level
        orbax_log.setLevel(max(level, logging.ERROR))
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        finally:
            orbax_log.setLevel(level)

    def latest_step(self) -> int | None:
        """Returns the step of the newest checkpoint on disk (not yet verified), or None; a step
        folder without a meta item (empty, partial) is skipped with a warning: not a checkpoint."""
        for step in sorted(self.all_steps(), reverse=True):
            folder = self.directory / str(step)
            if not folder.exists() or (folder / "meta").exists():  # not there yet: a save in flight
                return step
            what = "an empty folder" if not any(folder.iterdir()) else "no 'meta' item"
            logging.warning("Skipping %s: not a checkpoint (%s).", folder, what)
        return None

    def all_steps(self) -> list[int]:
        """Returns the steps of the checkpoints on disk, oldest first."""
        return sorted(self.manager.all_steps())

    # ------------------------------------------------------------------------ saving

    def save_items(self, step: int, items: dict, notes: dict | None = None) -> None:
        """Saves the array items {name: tree} at step with their checksums, and JSON notes
        (read back by restore_items) in the meta item; raises CheckpointError on NaN / Inf."""
        meta, digests = dict(self.meta, **({NOTES: notes} if notes is not None else {})), {}
        for name, tree in items.items():
            digests[name], bad = checksums(tree)
            if bad:
                raise CheckpointError(
                    f"Not saving step {step} to {self.directory}: {', '.join(bad[:3])} hold NaN "
                    "or Inf; the earlier checkpoints are kept."
                )
        meta[CHECKSUMS] = digests
        arrays = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self.wait()  # a failure of the previous save is told as that save's
        self.pending = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**arrays, meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as error:
            raise self._save_failed(error) from error

    def save(self, step: int, state: TrainState) -> None:
        """Starts an asynchronous save of state at step (returns before the write ends), its
        checksums computed first on the devices (one pass over the state)."""
        self.save_items(
            step,
            {
                "model": {"params": state.params, "batch_stats": state.batch_stats},
                "train": {"step": state.step, "opt_state": state.opt_state},
            },
        )

    def save_model(self, step: int, params, batch_stats) -> None:
        """Saves the model item alone (weights without a training state) at step."""
        self.save_items(step, {"model": {"params": params, "batch_stats": batch_stats}})

    # ------------------------------------------------------------------------ restoring

    def read_meta(self, step: int) -> dict:
        """Returns the meta item of the checkpoint at step."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, saved: dict | None = None) -> None:
        """Raises IncompatibleCheckpointError when the checkpoint at step was written under
        other settings (another model, another evaluation)."""
        saved = self.read_meta(step) if saved is None else saved
        diff = {k: (saved.get(k), v) for k, v in self.meta.items() if saved.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise IncompatibleCheckpointError(self.mismatch.format(where=self.directory / str(step), listed=listed))

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
                    step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(tree)})
                )[name]
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
                return f"{name}/{bad[0]} holds NaN or Inf" + (
                    f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
                )
        return None

    def _newest_verified(
        self, targets, step: int | None = None, verify: bool = True
    ) -> tuple[int, dict, list[tuple[int, str]], dict]:
        """Returns (step, {item: tree}, [(skipped step, why)], meta) of the newest checkpoint
        (or of `step`) that restores and verifies (unless not verify); raises CheckpointError
        when none does."""
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
                    logging.warning(
                        "Restored %s after skipping %s.",
                        self.directory / str(candidate),
                        "; ".join(f"step {s} ({why})" for s, why in skipped),
                    )
                return candidate, restored, skipped, meta
            logging.warning("Skipping the checkpoint %s: %s.", self.directory / str(candidate), reason)
            skipped.append((candidate, reason))
        if not skipped:
            raise FileNotFoundError(f"No checkpoint in {self.directory}: pre-train there first, or pass --weights.")
        listed = "; ".join(f"step {s}: {why}" for s, why in skipped)
        raise CheckpointError(
            f"No checkpoint in {self.directory} restores and verifies ({listed}). Nothing was changed: start "
            f"a new run with another --workdir, or move {self.directory} aside to start this one again."
        )

    def _move_aside(self, steps) -> None:
        """Moves skipped (damaged) step folders to workdir/damaged_checkpoints (process 0), so
        that a later save of the same step and the rotation do not meet them."""
        if not steps or self.read_only:
            return
        if jax.process_index() == 0:
            root = self.damaged
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
            multihost_utils.sync_global_devices("vicregl_jax.checkpoint.move_damaged_checkpoints")
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
                f"start a new run from them with --config.model.init_weights={self.workdir} and another --workdir."
            )
        targets = {
            "model": abstract_like({"params": like.params, "batch_stats": like.batch_stats}),
            "train": abstract_like({"step": like.step, "opt_state": like.opt_state}),
        }
        found, restored, skipped, _ = self.restore_items(targets, step)
        model, train = restored["model"], restored["train"]
        return found, TrainState(train["step"], model["params"], model["batch_stats"], train["opt_state"]), skipped

    def restore_model(self, params_like, batch_stats_like, step: int | None = None, *, verify: bool = True):
        """Returns (step, params, batch_stats, skipped) of the newest checkpoint (or of `step`)
        whose model item restores and verifies, laid out like the given (abstract) states.
        verify=False skips the checksums (a compiled pass, slow to compile for a large tree), for
        callers that check the files' bytes themselves (vicregl_jax.weights)."""
        targets = {"model": {"params": params_like, "batch_stats": batch_stats_like}}
        found, restored, skipped, _ = self._newest_verified(targets, step, verify)
        return found, restored["model"]["params"], restored["model"]["batch_stats"], skipped

    def restore_items(self, targets: dict, step: int | None = None) -> tuple[int, dict, list[tuple[int, str]], dict]:
        """Returns (step, {item: tree}, skipped, notes) of the newest checkpoint (or of `step`)
        that restores and verifies, each item laid out like its (abstract) target; skipped
        lists the newer checkpoints passed over, with why, which are moved aside to the
        workdir's damaged_checkpoints (unless read-only); notes are those saved with it."""
        found, restored, skipped, meta = self._newest_verified(targets, step)
        self.verified.step = found
        self._move_aside([s for s, _ in skipped])
        return found, restored, skipped, meta.get(NOTES) or {}

    def _save_failed(self, error: BaseException) -> CheckpointError:
        """Returns the one-line error of a failed save (of self.pending), naming the checkpoint kept."""
        step, self.pending = self.pending, None
        with contextlib.suppress(Exception):  # the storage may be failing still: the steps known before
            self.manager.reload()
        kept = [s for s in self.all_steps() if s != step]
        previous = f"step {kept[-1]}, the previous checkpoint, is intact" if kept else "no earlier checkpoint exists"
        return CheckpointError(
            f"Saving step {step} to {self.directory} failed ({_first_line(error)}); {previous}: run the same "
            "command again to resume."
        )

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk; raises CheckpointError (one line,
        naming the checkpoint kept) when one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._save_failed(error) from error
        self.pending = None

    def close(self) -> None:
        """Waits for pending saves (raising CheckpointError as wait does), then releases the manager."""
        try:
            self.wait()
        finally:
            self.manager.close()


def describe_skipped(skipped) -> str:
    """Returns "skipped step 5 (why); ..." for the checkpoints a restore passed over, or ""."""
    return "; ".join(f"skipped step {s} ({why})" for s, why in skipped)
