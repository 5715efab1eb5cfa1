"""The one loop that trains a head on a frozen backbone: linear classification and linear
segmentation both run it.

The head is an nnx module: its parameters are trained by an optax optimiser, its other state
(BatchNorm statistics) is what its own forward pass leaves. That state lives replicated on
the mesh and the jitted step donates it. Batch t comes from the caller's `batches(start)`,
an iterator from step `start` on (a seek, not a replay), and the random key of step t is
fold_in(key(seed), t): a run stopped and resumed from its checkpoint ends where an
uninterrupted run ends. Checkpoints go through checkpoint.Checkpointer (checksums, fallback
past a damaged one) under workdir/<name>_head; an evaluation's periodic scores are saved with
them, so that a resumed run reports the whole history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from vicregl_jax import sharding
from vicregl_jax.checkpoint import Checkpointer, abstract_like


@dataclasses.dataclass
class HeadTraining:
    """How a head is trained: steps, checkpoint cadence, periodic scoring, progress bar.

    evaluate(head) -> dict of scores, called every evaluate_every steps (and at the last
    one) with the head in eval mode; each call is recorded with the step and the mean loss
    since the one before. stop_after_steps stops this invocation there (after a checkpoint).
    """

    steps: int
    seed: int = 0
    checkpoint_every: int = 0
    evaluate: Callable[[nnx.Module], dict] | None = None
    evaluate_every: int = 0
    stop_after_steps: int | None = None
    progress: bool = True
    desc: str = "head"


def head_checkpointer(workdir, name: str, meta: dict) -> Checkpointer | None:
    """Returns the Checkpointer of a head under workdir/<name>_head (None without a workdir):
    the newest checkpoint kept, written under `meta` (another evaluation is refused)."""
    if workdir is None:
        return None
    return Checkpointer(workdir, meta, folder=f"{name}_head", items=("head",), keep=1, async_save=False)


def make_head_step(graph, tx: optax.GradientTransformation, loss_fn: Callable, seed: int, mesh) -> Callable:
    """Returns step(state, batch, t) -> (state, loss), jitted with the state donated:
    loss_fn(head, batch, key) is differentiated with respect to the head's parameters."""
    key = jax.random.key(seed)
    replicated = sharding.replicated(mesh)

    @jax.jit(donate_argnums=0, out_shardings=(replicated, replicated))
    def step(state, batch, t):
        def loss_of(params):
            net = nnx.merge(graph, params, *state.get("rest", ()), copy=True)
            loss = loss_fn(net, batch, jax.random.fold_in(key, t))
            return loss, nnx.split(net, nnx.Param, ...)[2:]

        (loss, rest), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
        return ({**new, "rest": rest} if "rest" in state else new), loss

    return step


def _initial_state(head: nnx.Module, tx, mesh) -> tuple:
    """Returns (graph, state): the head's parameters, its other state when it has some (a
    tree without leaves is left out: Orbax saves none), and the optimiser state, replicated."""
    graph, params, *rest = nnx.split(head, nnx.Param, ...)
    state = {"params": params, "opt_state": tx.init(params)}
    if jax.tree.leaves(rest):
        state["rest"] = tuple(rest)
    return graph, jax.device_put(state, sharding.replicated(mesh))


def _due(every: int, done: int, last: int) -> bool:
    """Returns whether an action every `every` steps (0: only at the last) is due after step `done`."""
    return done == last or (every > 0 and done % every == 0)


def _set_head(head: nnx.Module, state) -> None:
    nnx.update(head, state["params"], *state.get("rest", ()))


def train_head(
    head: nnx.Module,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    batches: Callable[[int], Iterator],
    how: HeadTraining,
    mesh,
    *,
    checkpointer: Checkpointer | None = None,
) -> tuple[int, list[dict]]:
    """Trains head in place for how.steps steps, resuming from the checkpointer's newest
    verified checkpoint; returns (the step reached, the records of how.evaluate).

    The step reached is how.steps unless how.stop_after_steps stopped it earlier. The head
    is left in eval mode holding the state of the step reached.
    """
    head.train()
    graph, state = _initial_state(head, tx, mesh)
    start, records = 0, []
    if checkpointer is not None and checkpointer.latest_step() is not None:
        start, restored, _, notes = checkpointer.restore_items({"head": abstract_like(state)})
        state, records = restored["head"], list(notes.get("records", []))
    step_fn = make_head_step(graph, tx, loss_fn, how.seed, mesh)
    end = how.steps if how.stop_after_steps is None else min(how.steps, how.stop_after_steps)
    bar = tqdm(
        total=how.steps, initial=start, desc=how.desc, unit="step", disable=not how.progress or jax.process_index() != 0
    )
    iterator, losses, step = batches(start), [], start
    try:
        for step in range(start, end):
            state, loss = step_fn(state, next(iterator), jnp.int32(step))
            losses.append(loss)
            done = step + 1
            if done % 50 == 0 or done == end:
                bar.set_postfix(loss=f"{float(loss):.4f}")
            bar.update(1)
            if how.evaluate is not None and _due(how.evaluate_every, done, how.steps):
                _set_head(head, state)
                head.eval()
                mean_loss = float(np.mean(jax.device_get(losses))) if losses else float("nan")
                records.append({"step": done, "train_loss": mean_loss, **how.evaluate(head)})
                head.train()
                losses = []
            if checkpointer is not None and _due(how.checkpoint_every, done, end):
                checkpointer.save_items(done, {"head": state}, notes={"records": records})
            step = done
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        bar.close()
    _set_head(head, state)
    head.eval()
    return step, records
