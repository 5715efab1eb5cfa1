"""Pre-training: the train state, the jitted sharded train step, and the loop.

Data flows one way: tf.data host batches -> global jax.Arrays on the mesh -> model -> loss ->
optimiser -> checkpoints and metrics. The step is one `jax.jit` over a ("data",) mesh with the
batch sharded, the state replicated or FSDP-sharded, and the state donated. Global batch
statistics (BatchNorm, VICReg variance and covariance) come from SPMD: no pmean anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from vicregl_jax import checkpoint as ckpt_lib
from vicregl_jax import config as config_lib
from vicregl_jax import data as data_lib
from vicregl_jax import losses, optim, sharding
from vicregl_jax.models.vicregl import VICRegLModel


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# Building blocks from the config
# --------------------------------------------------------------------------------------------


def compute_dtype(config) -> jnp.dtype:
    """Returns the compute dtype: bfloat16 on GPU / TPU and float32 on CPU for "auto"."""
    if config.compute_dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(config.compute_dtype)


def create_model(config, *, rngs: nnx.Rngs) -> VICRegLModel:
    """Returns the VICRegL model (backbone + heads) the config describes, in train mode."""
    model = VICRegLModel(
        arch=config.arch, mlp=config.mlp, maps_mlp=config.maps_mlp, alpha=config.alpha,
        num_classes=config.num_classes, dtype=compute_dtype(config),
        drop_path_rate=config.drop_path_rate, layer_scale_init=config.layer_scale_init, rngs=rngs,
    )
    model.train()
    return model


def loss_config(config) -> losses.LossConfig:
    """Returns the criterion's settings from the run config."""
    return losses.LossConfig(
        alpha=config.alpha, inv_coeff=config.inv_coeff, var_coeff=config.var_coeff,
        cov_coeff=config.cov_coeff, num_matches=tuple(config.num_matches),
        l2_all_matches=bool(config.l2_all_matches), fast_vc_reg=bool(config.fast_vc_reg),
    )


def crop_groups(config) -> list[data_lib.CropGroup]:
    """Returns the data pipeline's crop groups from config.crops."""
    return [data_lib.CropGroup(size=int(s), count=int(n), scale=(float(lo), float(hi))) for s, n, lo, hi in config.crops]


def schedule_and_optimizer(config, steps_per_epoch: int, total_steps: int):
    """Returns (learning-rate schedule, optax optimiser) of SPEC.md section 4."""
    warmup = int(config.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total_steps - 1)
    schedule = optim.learning_rate_schedule(
        base_lr=config.base_lr, batch_size=config.batch_size, total_steps=total_steps,
        warmup_steps=warmup, end_lr_ratio=config.end_lr_ratio,
    )
    kwargs = {"weight_decay": config.weight_decay}
    return schedule, optim.make_optimizer(config.optimizer, schedule, **kwargs)


# --------------------------------------------------------------------------------------------
# The train state (a plain pytree) and its shardings
# --------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training; the graph definition stays outside."""

    step: jax.Array
    params: Any  # nnx.State of the nnx.Param variables
    model_state: Any  # nnx.State of the rest: BatchNorm statistics, RNG streams
    opt_state: Any


def _split(model):
    return nnx.split(model, nnx.Param, ...)


def init_train_state(config, tx, mesh) -> tuple[nnx.GraphDef, TrainState, Any]:
    """Returns (graphdef, state, state shardings), the state created directly sharded."""
    seed = config.seed

    def init():
        model = create_model(config, rngs=nnx.Rngs(seed))
        _, params, rest = _split(model)
        return TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params))

    abstract = jax.eval_shape(init)
    graphdef = _split(nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(seed))))[0]
    shardings = sharding.param_shardings(abstract, mesh, config.param_sharding, config.sharding_rules)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def apply_init_weights(config, graphdef, state: TrainState, shardings) -> TrainState:
    """Returns state with the weights of config.init_weights (a PyTorch file of the release,
    backbone or full checkpoint, or another pre-training workdir) loaded into the model."""
    from vicregl_jax import convert

    path = config.init_weights
    model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.model_state), copy=True)
    if str(path).endswith(convert.TORCH_SUFFIXES):
        parts = convert.load_torch_state_dict(model, convert.read_torch_weights(path))
        logging.info("Initial weights from %s: %s", path, ", ".join(parts))
    else:
        source, _, step = load_model(path)
        ours, theirs = (nnx.state(m, nnx.Param) for m in (model, source))
        shapes = [{p: v.shape for p, v in nnx.to_flat_state(t)} for t in (ours, theirs)]
        mismatch = {p for p in shapes[0].keys() | shapes[1].keys() if shapes[0].get(p) != shapes[1].get(p)}
        if mismatch:
            raise ValueError(f"config.init_weights={path!r} holds another model ({len(mismatch)} parameters differ in name or shape, "
                             f"e.g. {sorted(map(str, mismatch))[:3]}); use a workdir of the same arch and heads.")
        nnx.update(model, theirs, nnx.state(source, nnx.BatchStat))
        logging.info("Initial weights from %s (step %d)", path, step)
    _, params, rest = _split(model)
    new = TrainState(state.step, params, rest, state.opt_state)
    return jax.device_put(new, shardings)


# --------------------------------------------------------------------------------------------
# The train step
# --------------------------------------------------------------------------------------------


def make_train_step(graphdef, tx, schedule, loss_cfg: losses.LossConfig, grad_accum_steps: int = 1):
    """Returns train_step(state, batch) -> (state, metrics), pure and ready for jax.jit.

    With grad_accum_steps k > 1 the batch is cut into k micro-batches (example b goes to
    micro-batch b % k, which keeps each device's examples on the device), gradients are
    averaged, and BatchNorm and VICReg statistics are over each micro-batch. A step whose
    loss is not finite leaves the state unchanged; metrics["finite"] tells the host.
    """

    def micro_loss(params, model_state, micro):
        # copy: the model mutates its statistics under this trace, not the caller's Variables.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        out = model(micro["views"])
        total, terms = losses.vicregl_loss(
            out["embeddings"], out["local_embeddings"], micro["grids"], loss_cfg,
            logits=out["logits"], labels=micro["label"],
        )
        embedding0 = out["embeddings"][0][:, 0] if out["embeddings"] is not None else None
        terms.update(losses.collapse_metrics(out["representations"][0][:, 0], embedding0))
        _, _, new_model_state = _split(model)
        return total, (new_model_state, terms)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, batch):
        if grad_accum_steps == 1:
            (_, (model_state, metrics)), grads = grad_fn(state.params, state.model_state, batch)
        else:
            k = grad_accum_steps
            micro_batches = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)

            def body(carry, micro):
                model_state, grad_sum = carry
                (_, (model_state, metrics)), grads = grad_fn(state.params, model_state, micro)
                return (model_state, jax.tree.map(jnp.add, grad_sum, grads)), metrics

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (model_state, grad_sum), metrics = jax.lax.scan(body, (state.model_state, zeros), micro_batches)
            grads = jax.tree.map(lambda g: g / k, grad_sum)
            metrics = jax.tree.map(jnp.mean, metrics)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"])
        new = TrainState(state.step + 1, params, model_state, opt_state)
        # A non-finite step keeps the old state, so the last good state is what gets saved.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = dict(metrics, finite=finite, learning_rate=schedule(state.step))
        return new, metrics

    return train_step


def jit_train_step(train_step, state_shardings, mesh):
    """Returns the jitted step: batch sharded over "data", state sharded as given and donated."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


# --------------------------------------------------------------------------------------------
# Checkpoint conversion (typed PRNG keys are stored as their raw data)
# --------------------------------------------------------------------------------------------


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(state: TrainState) -> dict:
    """Returns the state as nested dicts of plain arrays (typed PRNG keys as key data)."""
    tree = {
        "step": state.step,
        "params": nnx.to_pure_dict(state.params),
        "model_state": nnx.to_pure_dict(state.model_state),
        "opt_state": state.opt_state,
    }
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_saveable(saved: dict, like: TrainState) -> TrainState:
    """Returns a TrainState shaped like `like` from the dicts of `to_saveable`."""
    template = to_saveable(like)
    keys_like = {
        "step": like.step, "params": nnx.to_pure_dict(like.params),
        "model_state": nnx.to_pure_dict(like.model_state), "opt_state": like.opt_state,
    }
    restored = jax.tree.map(
        lambda s, t, orig: jax.random.wrap_key_data(s, impl=jax.random.key_impl(orig)) if _is_key(orig) else s,
        saved, template, keys_like,
    )
    params = like.params
    nnx.replace_by_pure_dict(params, restored["params"])
    model_state = like.model_state
    nnx.replace_by_pure_dict(model_state, restored["model_state"])
    return TrainState(restored["step"], params, model_state, restored["opt_state"])


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class MetricsLog:
    """Host 0 writes scalars to TensorBoard (clu) and to workdir/metrics.jsonl."""

    def __init__(self, workdir):
        from clu import metric_writers

        self.enabled = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(str(workdir), just_logging=not self.enabled)
        self.jsonl = None
        if self.enabled:
            self.jsonl = (epath.Path(workdir) / "metrics.jsonl").open("a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.writer.write_scalars(step, scalars)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        self.writer.flush()
        if self.jsonl is not None:
            self.jsonl.close()


def _progress_bar(total: int, initial: int):
    if jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="pretrain")


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    step: int
    stopped_early: bool
    last_metrics: dict


def train_and_evaluate(config, workdir: str, *, stop_after_steps: int | None = None) -> RunResult:
    """Pre-trains VICRegL as config says, resuming from workdir when it holds a checkpoint.

    stop_after_steps stops this invocation after that many steps (checkpointing first), as a
    preemption would; the schedule still runs to the config's total.
    """
    mesh = sharding.make_mesh(config.num_devices)
    config_lib.validate(config, num_devices=mesh.size, process_count=jax.process_count())
    workdir = ckpt_lib.absolute(workdir)

    checkpointer = ckpt_lib.Checkpointer(workdir, config, keep=config.keep_checkpoints)
    latest = checkpointer.latest_step()
    start = 0 if latest is None else latest
    # The pipeline's position is a function of the step: resuming is a seek to `start`.
    iterator = data_lib.make_pretrain_iterator(
        config.dataset, config.train_split, groups=crop_groups(config), global_batch_size=config.batch_size,
        seed=config.seed, stride=_stride(config), flip_grid=config.flip_grid, with_labels=True,
        data_dir=config.data_dir, manual_dir=config.manual_dir, process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=start,
    )
    num_examples = config.num_train_examples or iterator.num_examples
    steps_per_epoch = max(1, num_examples // config.batch_size)
    total_steps = config.total_steps or int(config.epochs * steps_per_epoch)
    schedule, tx = schedule_and_optimizer(config, steps_per_epoch, total_steps)

    graphdef, state, state_shardings = init_train_state(config, tx, mesh)
    if latest is not None:
        saved = checkpointer.restore(start, to_saveable(state))
        state = from_saveable(saved, state)
        if jax.process_index() == 0:
            print(f"Resuming from {checkpointer.directory} at step {start} of {total_steps}.", flush=True)
    else:
        if config.init_weights:
            state = apply_init_weights(config, graphdef, state, state_shardings)
        ckpt_lib.save_config(workdir, config)

    knn_every = 0  # steps between kNN monitors
    if config.knn_every_epochs:
        from vicregl_jax.evaluate import knn

        knn.check_labelled(config)  # fail now, not after the first N epochs
        knn_every = max(1, round(config.knn_every_epochs * steps_per_epoch))

    step_fn = jit_train_step(
        make_train_step(graphdef, tx, schedule, loss_config(config), config.grad_accum_steps), state_shardings, mesh
    )
    log = MetricsLog(workdir)
    watcher = ckpt_lib.PreemptionWatcher(checkpointer.manager)
    bar = _progress_bar(total_steps, start)
    step = start
    last_saved = start
    last_metrics: dict = {}
    stopped_early = False
    window_start, window_steps = time.perf_counter(), 0
    pending = None  # (step, metrics) of the previous step, read one step late to keep the device busy
    try:
        while step < total_steps:
            batch = data_lib.to_global_batch(next(iterator), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            window_steps += 1
            if pending is not None:
                _check_finite(*pending, checkpointer)
            pending = (step, metrics)
            if step % config.log_every_steps == 0 or step == total_steps:
                _check_finite(*pending, checkpointer)
                pending = None
                elapsed = time.perf_counter() - window_start
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                last_metrics["step_time_s"] = elapsed / window_steps
                last_metrics["images_per_s"] = config.batch_size * window_steps / elapsed
                last_metrics["skipped_images"] = float(iterator.num_skipped)
                log.write(step, last_metrics)
                window_start, window_steps = time.perf_counter(), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{last_metrics['loss']:.3f}", stdr=f"{last_metrics['stdr']:.3f}")
            if knn_every and (step % knn_every == 0 or step == total_steps):
                if pending is not None:  # never evaluate a diverged state
                    _check_finite(*pending, checkpointer)
                    pending = None
                scores = knn_monitor(graphdef, state, config, mesh)
                log.write(step, scores)
                last_metrics.update(scores)
                if bar is not None:
                    bar.write(f"step {step}: kNN top-1 {scores['knn_top1']:.2f}, top-5 {scores['knn_top5']:.2f}")
                window_start = time.perf_counter()  # keep the kNN out of the step time
            if bar is not None:
                bar.update(1)
            preempted = watcher.should_stop(step)
            asked_to_stop = stop_after_steps is not None and step - start >= stop_after_steps
            if step % config.checkpoint_every_steps == 0 or step == total_steps or preempted or asked_to_stop:
                if pending is not None:
                    _check_finite(*pending, checkpointer)
                    pending = None
                checkpointer.save(step, to_saveable(state))
                last_saved = step
            if preempted or asked_to_stop:
                stopped_early = True
                logging.warning("Stopping at step %d (checkpoint saved).", step)
                break
        if pending is not None:
            _check_finite(*pending, checkpointer)
        if last_saved != step:
            checkpointer.save(step, to_saveable(state))
    finally:
        if bar is not None:
            bar.close()
        watcher.close()
        log.close()
        checkpointer.close()
    return RunResult(step=step, stopped_early=stopped_early, last_metrics=last_metrics)


def knn_monitor(graphdef, state: TrainState, config, mesh) -> dict[str, float]:
    """kNN top-1 / top-5 (%) of the current backbone, in eval mode, on config.eval_dataset."""
    from vicregl_jax.evaluate import knn

    model = nnx.merge(graphdef, state.params, state.model_state)
    model.eval()
    results = knn.evaluate_backbone(model.backbone, config, mesh)
    return {"knn_top1": results["top1"], "knn_top5": results["top5"]}


def load_model(workdir, step: int | None = None) -> tuple[VICRegLModel, Any, int]:
    """Returns (model in eval mode, config, step) from a pre-training workdir's checkpoint."""
    import ml_collections

    config = ml_collections.ConfigDict(ckpt_lib.load_config_json(workdir))
    step, saved = ckpt_lib.read_state(workdir, step)
    model = create_model(config, rngs=nnx.Rngs(config.seed))
    _, params, rest = _split(model)
    nnx.replace_by_pure_dict(params, saved["params"])
    # Only the BatchNorm statistics matter outside training; the RNG streams stay fresh.
    rest_pure = nnx.to_pure_dict(rest)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, fresh: _lookup(saved["model_state"], path, fresh), rest_pure
    )
    nnx.replace_by_pure_dict(rest, stats)
    model = nnx.merge(_split(model)[0], params, rest)
    model.eval()
    return model, config, step


def _lookup(tree, path, default):
    for key in path:
        name = getattr(key, "key", getattr(key, "idx", None))
        if isinstance(tree, dict) and name in tree:
            tree = tree[name]
        elif isinstance(tree, dict) and str(name) in tree:
            tree = tree[str(name)]
        else:
            return default
    if getattr(tree, "shape", None) != getattr(default, "shape", None) or tree.dtype != default.dtype:
        return default  # RNG key data vs typed keys: keep the fresh stream
    return tree


def _check_finite(step: int, metrics, checkpointer) -> None:
    if not bool(metrics["finite"]):
        kept = checkpointer.latest_step()
        raise NonFiniteLossError(
            f"The loss is {float(metrics['loss'])} at step {step}: stopping. The state of that step was "
            f"not applied and not saved; the last good checkpoint is step {kept} in {checkpointer.directory}. "
            "Lower config.base_lr, use compute_dtype='float32', or check the data."
        )


def _stride(config) -> int:
    from vicregl_jax.models import backbone_stride

    return backbone_stride(config.arch)
