"""Pre-training: the jitted sharded train step, and a loop of small periodic actions.

Data flows one way: tf.data host batches -> global jax.Arrays on the mesh -> model -> loss ->
optimiser -> checkpoints and metrics. The step is one `jax.jit` over a ("data",) mesh with the
batch sharded, the state replicated or FSDP-sharded, and the state donated. Global batch
statistics (BatchNorm, VICReg variance and covariance) come from SPMD: no pmean anywhere.
The parts of a run (mesh, iterator, state, optimiser, checkpointer) come from build.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from tqdm import tqdm

from vicregl_jax import build, coordination, losses, metrics, safe_io, sharding, stopping, storage_retries
from vicregl_jax import data as data_lib
from vicregl_jax import workdir as workdir_lib
from vicregl_jax.checkpoint import DAMAGED_DIR, TrainState, describe_skipped
from vicregl_jax.evaluate import knn
from vicregl_jax.model_config import seed_random_streams, split_model


class NonFiniteLossError(RuntimeError):
    """The loss, or the state after an update, became NaN or Inf; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# The train step
# --------------------------------------------------------------------------------------------


def coloured_views(batch) -> tuple:
    """Returns the batch's views per crop group, colour-augmented from the host's draws and
    normalised (float32) on the device; views without draws are already normalised."""
    if "draws" not in batch:
        return batch["views"]
    return tuple(data_lib.augment_views(v, d) for v, d in zip(batch["views"], batch["draws"]))


def make_train_step(
    graphdef, random_streams, tx, schedule, loss_cfg: losses.LossConfig, *, seed: int = 0, grad_accum_steps: int = 1
):
    """Returns train_step(state, batch) -> (state, metrics), pure and ready for jax.jit.

    The drop-path streams are reseeded every step from (seed, step, micro-batch): the
    randomness is a function of the step, like the data. With grad_accum_steps k > 1 the
    batch is cut into k micro-batches (example b goes to micro-batch b % k, which keeps each
    device's examples on the device), gradients are averaged, and BatchNorm and VICReg
    statistics are over each micro-batch. A step whose loss or new state (parameters,
    BatchNorm statistics, optimiser state) is not finite leaves the state unchanged;
    metrics["finite"] tells the host.
    """
    base_key = jax.random.key(seed)

    def micro_loss(params, batch_stats, micro, key):
        # copy: the model mutates its statistics under this trace, not the caller's Variables.
        model = nnx.merge(graphdef, params, batch_stats, random_streams, copy=True)
        seed_random_streams(model, key)
        with jax.named_scope("augment"):
            views = coloured_views(micro)
        out = model(views)
        total, terms = losses.vicregl_loss(
            out["embeddings"],
            out["local_embeddings"],
            micro["grids"],
            loss_cfg,
            logits=out["logits"],
            labels=micro["label"],
        )
        embedding0 = out["embeddings"][0][:, 0] if out["embeddings"] is not None else None
        terms.update(metrics.collapse_metrics(out["representations"][0][:, 0], embedding0))
        return total, (split_model(model)[2], terms)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(base_key, state.step)
        if grad_accum_steps == 1:
            (_, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, key)
        else:
            k = grad_accum_steps
            micro_batches = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch
            )

            def body(carry, micro_and_index):
                batch_stats, grad_sum = carry
                micro, i = micro_and_index
                (_, (batch_stats, metrics)), grads = grad_fn(
                    state.params, batch_stats, micro, jax.random.fold_in(key, i)
                )
                return (batch_stats, jax.tree.map(jnp.add, grad_sum, grads)), metrics

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (batch_stats, grad_sum), metrics = jax.lax.scan(
                body, (state.batch_stats, zeros), (micro_batches, jnp.arange(k))
            )
            grads = jax.tree.map(lambda g: g / k, grad_sum)
            metrics = jax.tree.map(jnp.mean, metrics)

        with jax.named_scope("optimiser"):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        # A finite loss can still give a NaN / Inf update (a huge learning rate): check what is kept.
        finite = jnp.isfinite(metrics["loss"]) & all_finite((params, batch_stats, opt_state))
        new = TrainState(state.step + 1, params, batch_stats, opt_state)
        # A non-finite step keeps the old state, so the last good state is what gets saved.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = dict(metrics, finite=finite, learning_rate=schedule(state.step))
        return new, metrics

    return train_step


def all_finite(tree) -> jax.Array:
    """Returns whether every floating-point element of tree is finite, as one boolean (XLA
    fuses each leaf's test into the fusion that computes the leaf: no extra pass over memory)."""
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def jit_train_step(train_step, state_shardings, mesh):
    """Returns the jitted step: batch sharded over "data", state sharded as given and donated.

    The step traces on the mesh (sharding.step_context): activations constrained to the batch
    axis, the criterion's statistics with explicit collectives, FSDP-sharded weights gathered
    just in time and their gradients reduce-scattered.
    """
    return jax.jit(
        sharding.on_mesh(train_step, mesh, state_shardings.params),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def eval_model(run: build.Run, state: TrainState):
    """Returns the model of the run's current state, in eval mode (shares the state's arrays)."""
    model = nnx.merge(run.graphdef, state.params, state.batch_stats, run.random_streams)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# What the loop does besides stepping
# --------------------------------------------------------------------------------------------


def _rows_up_to(path, step: int) -> list[str]:
    """Returns the lines of metrics.jsonl of steps up to step; a line that does not parse (a
    write cut short, by a full disk or a kill) is dropped with a warning, never an error."""
    kept, damaged = [], []
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            at = int(row.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            damaged.append(number)
            continue
        if at <= step:
            kept.append(line)
    if damaged:
        where = f"{path}: dropped {len(damaged)} damaged line(s) (line {', '.join(map(str, damaged[:5]))}"
        logging.warning("%s; a write cut short, e.g. by a full disk); kept the rest.", where)
    return kept


class MetricsLog:
    """Host 0 writes scalars to TensorBoard (clu) and to workdir/metrics.jsonl.

    On resume, rows of steps after the resumed one (written before an interruption, then
    replayed) are dropped, so that metrics.jsonl reads as one run.
    """

    def __init__(self, workdir, start_step: int):
        # clu's writers import TensorFlow: imported here, on the lazy TensorFlow boundary, so
        # that the train step imports where TensorFlow is not installed.
        from clu import metric_writers

        self.enabled = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(str(workdir), just_logging=not self.enabled)
        self.jsonl = None
        if self.enabled:
            path = epath.Path(workdir) / "metrics.jsonl"
            kept = _rows_up_to(path, start_step) if path.exists() else []
            safe_io.write_atomic(path, "".join(line + "\n" for line in kept))
            # Opened by TensorFlow's file API: epath opens a gs:// file only as a context manager.
            import tensorflow as tf

            self.jsonl = tf.io.gfile.GFile(str(path), "a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.writer.write_scalars(step, scalars)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        self.writer.flush()
        if self.jsonl is not None:
            self.jsonl.close()


def every(n: int, step: int, last: int) -> bool:
    """Returns whether an action run every n steps (and at the last step) is due at step."""
    return n > 0 and (step % n == 0 or step == last)


def check_finite(step: int, metrics, checkpointer) -> None:
    """Raises NonFiniteLossError when the step's loss or its updated state was not finite."""
    if not bool(metrics["finite"]):
        loss = float(metrics["loss"])
        what = (
            f"The loss is {loss} at step {step}"
            if not np.isfinite(loss)
            else f"The update gave NaN or Inf parameters or optimiser state (loss {loss:.4g}) at step {step}"
        )
        kept = checkpointer.latest_step()
        kept = (
            f"the last good checkpoint is step {kept} in {checkpointer.directory}"
            if kept is not None
            else "no checkpoint was saved before it"
        )
        raise NonFiniteLossError(
            f"{what}: stopping. The state of that step was not applied and not saved; {kept}. "
            f"Lower config.optim.base_lr (now {float(metrics['learning_rate']):.3g} at that step), use "
            "config.model.dtype='float32', or check the data."
        )


def knn_monitor(run: build.Run, state: TrainState, config) -> dict[str, float]:
    """kNN top-1 / top-5 (%) of the current backbone, in eval mode, on config.eval's dataset."""
    results = knn.evaluate_config(eval_model(run, state).backbone, config, run.mesh)
    return {"knn_top1": results["top1"], "knn_top5": results["top5"]}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    step: int | None  # None: stopped during start-up, before the run had a state
    stopped_early: bool
    last_metrics: dict
    signum: int | None = None  # the signal that stopped it (SIGTERM, SIGINT), if one did

    @property
    def exit_code(self) -> int:
        """Returns the process's exit status: 0 when done, 75 stopped by SIGTERM (or
        stop_after_steps), 130 by SIGINT."""
        return stopping.exit_code(self.signum) if self.stopped_early else 0


def train_and_evaluate(config, workdir: str, *, stop_after_steps: int | None = None, check: bool = True) -> RunResult:
    """Pre-trains VICRegL as config says, resuming from workdir when it holds a checkpoint.

    stop_after_steps stops this invocation after that many steps (checkpointing first), as a
    preemption would; the schedule still runs to the config's total. check: run the config
    check first (main.py has run it). SIGTERM and SIGINT stop it resumably (vicregl_jax.stopping).
    A full disk raises safe_io.DiskFullError (one line: where, how much a checkpoint needs).
    """
    if check:
        build.check_config(config, "pretrain", workdir=workdir)
    workdir = workdir_lib.absolute(workdir)
    try:
        with workdir_lib.WorkdirLock(workdir):  # one run at a time (process 0 holds it)
            watcher = stopping.StopWatcher()
            try:
                return _train(config, workdir, stop_after_steps, watcher)
            except stopping.StopRequested as stop:
                return RunResult(step=None, stopped_early=True, last_metrics={}, signum=stop.signum)
            finally:
                watcher.close()
    except Exception as error:
        if not isinstance(error, safe_io.DiskFullError) and safe_io.is_disk_full(error):
            raise _disk_full(workdir) from error
        raise


def _disk_full(workdir) -> safe_io.DiskFullError:
    """Returns the one-line error of a run that found its disk full: where, and how much room the
    next checkpoint needs (the size of the newest one on disk)."""
    folder = str(epath.Path(workdir) / "checkpoints")
    local = not workdir_lib.is_remote(folder) and os.path.isdir(folder)
    steps = sorted((int(name) for name in os.listdir(folder) if name.isdigit()), reverse=True) if local else []
    need = ""
    for step in steps:
        walked = os.walk(os.path.join(folder, str(step)))
        size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in walked for name in names)
        if size:
            need = f" (a checkpoint needs about {size / 2**20:.1f} MiB; the newest on disk is step {step})"
            break
    return safe_io.disk_full_error(workdir, need, "the run resumes from its newest checkpoint, which is intact")


def _announce_resume(run: build.Run, workdir) -> None:
    """Prints, on process 0, where a resumed run starts and which damaged checkpoints it skipped."""
    if run.resumed and jax.process_index() == 0:
        skipped = f" ({describe_skipped(run.skipped)}; moved to {workdir / DAMAGED_DIR})" if run.skipped else ""
        print(
            f"Resuming from {run.checkpointer.directory} at step {run.start_step} of {run.total_steps}{skipped}.",
            flush=True,
        )


def _jitted_step(run: build.Run, config):
    """Returns the run's train step, jitted with its state shardings on its mesh."""
    return jit_train_step(
        make_train_step(
            run.graphdef,
            run.random_streams,
            run.tx,
            run.schedule,
            run.loss,
            seed=config.seed,
            grad_accum_steps=config.grad_accum_steps,
        ),
        run.shardings,
        run.mesh,
    )


def _progress_bar(run: build.Run) -> tqdm:
    """Returns the pre-training progress bar, shown on process 0 only."""
    return tqdm(
        total=run.total_steps,
        initial=run.start_step,
        unit="step",
        dynamic_ncols=True,
        desc="pretrain",
        disable=jax.process_index() != 0,
    )


def _peer_failure(error: Exception) -> coordination.PeerFailureError | None:
    """Reports this host's failure; returns a PeerFailureError naming the hosts that stopped first, or None."""
    # On several hosts: say why this one stops, and when a collective fails here because
    # another host stopped first, name that host's error rather than the bare timeout.
    coordination.report_failure(error)
    if isinstance(error, jax.errors.JaxRuntimeError):
        peers = coordination.peer_failures(wait_s=coordination.PEER_FAILURE_WAIT_S)
        if peers:
            return coordination.PeerFailureError(
                "; ".join(f"process {i} stopped the run: {message}" for i, message in sorted(peers.items()))
            )
    return None


def _train(config, workdir, stop_after_steps: int | None, watcher: stopping.StopWatcher) -> RunResult:
    retries = storage_retries.RetryCount()  # from the start: the restore reads the bucket too
    run = build.build_run(config, workdir)
    with contextlib.ExitStack() as stack:  # closed in reverse, also when a signal stops the start-up
        stack.callback(retries.log_total)  # last: the final save's requests counted too
        stack.callback(run.checkpointer.close)
        stack.callback(run.iterator.close)
        _announce_resume(run, workdir)
        step_fn = _jitted_step(run, config)
        log = MetricsLog(workdir, run.start_step)
        stack.callback(log.close)
        watcher.manager = run.checkpointer.manager
        stack.callback(watcher.finish)
        bar = stack.enter_context(_progress_bar(run))
        batches = data_lib.prefetch_to_mesh(run.iterator, run.mesh)  # two batches on the devices ahead
        stack.callback(batches.close)
        try:
            return _loop(run, config, step_fn, batches, log, bar, watcher, stop_after_steps, retries)
        except Exception as error:
            peer_error = _peer_failure(error)
            if peer_error is not None:
                raise peer_error from error
            raise


def _loop(run, config, step_fn, batches, log, bar, watcher, stop_after_steps, retries) -> RunResult:
    """Steps from run.start_step to its total: logs, evaluates, saves and stops as due."""
    knn_every = max(1, round(config.knn_every_epochs * run.steps_per_epoch)) if config.knn_every_epochs else 0
    state, step, total = run.state, run.start_step, run.total_steps
    last_saved, last_metrics, stopped_early = run.start_step, {}, False
    window_start, window_steps = time.perf_counter(), 0
    pending = None  # (step, metrics) of a step not yet checked: read one step late to keep the device busy
    while step < total:
        state, metrics = step_fn(state, next(batches))
        watcher.raising = False  # there is a state to save from here on: a signal waits for the step's end
        step += 1
        window_steps += 1
        bar.update(1)
        if pending is not None:
            check_finite(*pending, run.checkpointer)
        pending = (step, metrics)
        preempted = watcher.should_stop(step)
        stopping_now = preempted or (stop_after_steps is not None and step - run.start_step >= stop_after_steps)
        log_now, knn_now = every(config.log_every_steps, step, total), every(knn_every, step, total)
        save_now = every(config.checkpoint.every_steps, step, total) or stopping_now
        if not (log_now or knn_now or save_now):
            continue
        check_finite(*pending, run.checkpointer)  # never log, evaluate or save a diverged state
        pending = None
        if log_now:
            elapsed = time.perf_counter() - window_start
            last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
            last_metrics.update(
                step_time_s=elapsed / window_steps,
                images_per_s=config.batch_size * window_steps / elapsed,
                skipped_images=float(batches.num_skipped),
                storage_retries=float(retries.log_new(step)),
            )
            log.write(step, last_metrics)
            bar.set_postfix(loss=f"{last_metrics['loss']:.3f}", stdr=f"{last_metrics['stdr']:.3f}")
            window_start, window_steps = time.perf_counter(), 0
        if knn_now:
            scores = knn_monitor(run, state, config)
            log.write(step, scores)
            last_metrics.update(scores)
            bar.write(f"step {step}: kNN top-1 {scores['knn_top1']:.2f}, top-5 {scores['knn_top5']:.2f}")
            window_start = time.perf_counter()  # keep the kNN out of the step time
        if save_now:
            run.checkpointer.save(step, state)
            last_saved = step
        if stopping_now:
            run.checkpointer.wait()  # on disk before closing the input, which a blocked read can hang
            stopped_early = True
            logging.warning("Stopping at step %d (checkpoint saved).", step)
            break
    if pending is not None:
        check_finite(*pending, run.checkpointer)
    if last_saved != step:
        run.checkpointer.save(step, state)
    signum = watcher.signum if stopped_early else None
    return RunResult(step=step, stopped_early=stopped_early, last_metrics=last_metrics, signum=signum)
