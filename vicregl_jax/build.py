"""Turns a config into the parts of a pre-training run: mesh, input iterator, criterion
settings, optimiser and schedule, the sharded train state (fresh, from initial weights, or
restored) and its checkpointer; and holds the one config check of every run.

Every constructor validates the subtree of the config it owns (`config.loss` in LossConfig,
`config.model` in VICRegLModel, `config.optim.name` in the optimiser registry, the crops in
CropGroup, `config.eval.segment` in SegmentSettings); `check_config` runs those a mode needs,
cheaply, with the single-value checks of `config.check_values`, the cross-part checks of
`config.validate` and the workdir's, so a bad value fails in seconds, before any data or
weights are touched. main.py calls it once per run; each mode's entry point calls it when
called from Python (check=True). Below this layer functions take the config's sections.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vicregl_jax import config as config_lib
from vicregl_jax import data as data_lib
from vicregl_jax import losses, models, optim, release, sharding, torch_io
from vicregl_jax import weights as weights_lib
from vicregl_jax import workdir as workdir_lib
from vicregl_jax.checkpoint import Checkpointer, TrainState
from vicregl_jax.evaluate import segment_settings
from vicregl_jax.model_config import MODEL_KEYS, abstract_model, create_model, model_meta, split_model

# What each mode of main.py runs, for the checks: the demo pre-trains and evaluates.
MODES = {
    "pretrain": ("pretrain",),
    "knn": ("knn",),
    "linear": ("linear",),
    "segment": ("segment",),
    "correspond": ("correspond",),
    "export": (),
    "demo": ("pretrain", "knn", "linear", "correspond"),
}


def loss_config(config) -> losses.LossConfig:
    """Returns the criterion's settings: config.loss as a LossConfig (which validates them)."""
    return losses.LossConfig(**{**config.loss.to_dict(), "num_matches": tuple(config.loss.num_matches)})


def crop_groups(config) -> list:
    """Returns the pipeline's crop groups (data.CropGroup validates each) from config.data.crops."""
    return [
        data_lib.CropGroup(size=int(s), count=int(n), scale=(float(lo), float(hi)))
        for s, n, lo, hi in config.data.crops
    ]


def make_optimizer(
    config, steps_per_epoch: int, total_steps: int
) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """Returns (learning-rate schedule, optax optimiser) of the release's recipe."""
    warmup = min(int(config.optim.warmup_epochs * steps_per_epoch), total_steps - 1)
    schedule = optim.learning_rate_schedule(
        base_lr=config.optim.base_lr,
        batch_size=config.batch_size,
        total_steps=total_steps,
        warmup_steps=warmup,
        end_lr_ratio=config.optim.end_lr_ratio,
    )
    return schedule, optim.make_optimizer(config.optim.name, schedule, weight_decay=config.optim.weight_decay)


def check_config(
    config, *modes: str, workdir=None, num_devices: int | None = None, process_count: int | None = None
) -> None:
    """Raises ValueError (FileNotFoundError for a missing file), naming the key and the fix,
    for any value the modes (main.py's; "pretrain" when none is given) cannot use, and for a
    workdir that cannot be written: the one check of a run, before anything is touched."""
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ValueError(f"mode {unknown[0]!r}: use one of {', '.join(MODES)}.")
    parts = [part for mode in (modes or ("pretrain",)) for part in MODES[mode]]
    if workdir is not None:
        workdir_lib.check_workdir(workdir)
    config_lib.check_values(config)
    if "pretrain" in parts:
        num_devices = num_devices or sharding.make_mesh(config.mesh.num_devices).size
        _check_pretraining(config, num_devices, jax.process_count() if process_count is None else process_count)
    abstract_model(
        config.model, config.loss.alpha, config.seed
    )  # the model's own checks: heads, dtype, ConvNeXt options
    try:
        read = data_lib.ReadOptions.from_config(config.data)
    except ValueError as e:
        raise ValueError(f"config.data.{e}") from None
    if "pretrain" in parts and config.data.service and read.resize != "tensorflow":
        raise ValueError(
            f"config.data.resize={read.resize!r} with config.data.service={config.data.service!r}: the tf.data "
            "service's workers run TensorFlow ops only; set --config.data.resize=tensorflow with the service."
        )
    if "linear" in parts and config.eval.linear.mode not in ("protocol", "fast"):
        raise ValueError(f"config.eval.linear.mode={config.eval.linear.mode!r}; use 'protocol' or 'fast'.")
    if "segment" in parts:
        segment_settings.settings_from_config(
            config.eval.segment, segment_settings.arch_family(config.model.arch), arch=config.model.arch
        )
    knn = "knn" in parts or ("pretrain" in parts and config.knn_every_epochs)
    if knn or "linear" in parts:  # the same dataset and splits for both
        _check_labelled(config, "kNN" if knn else "Linear evaluation")


def _check_pretraining(config, num_devices: int, process_count: int) -> None:
    """Raises ValueError for a pre-training value: cross-part facts, the criterion, crops, optimiser."""
    config_lib.validate(config, num_devices=num_devices, process_count=process_count)
    loss_config(config)
    crop_groups(config)
    optim.make_optimizer(config.optim.name, 0.0, weight_decay=config.optim.weight_decay)


def _check_labelled(config, task: str) -> None:
    """Raises ValueError when the image-level evaluations' dataset has no labels in a split."""
    dataset = config.eval.dataset or config.data.dataset
    for split in (config.eval.train_split, config.eval.split):
        source = data_lib.open_source(dataset, split, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir)
        if source.num_classes == 0:
            raise ValueError(
                f"{task} needs labels, and the dataset {dataset!r} ({split}) has none: set --config.eval.dataset "
                "to a labelled dataset (e.g. imagenet2012, or vicregl_digits for the demo)."
            )


def schedule_length(config, num_examples: int) -> tuple[int, int]:
    """Returns (steps per epoch, total steps) for a dataset of num_examples."""
    steps_per_epoch = max(1, num_examples // config.batch_size)
    total = config.total_steps if config.total_steps is not None else int(config.epochs * steps_per_epoch)
    return steps_per_epoch, total


def pretrain_iterator(config, start_step: int):
    """Returns this host's pre-training batches from start_step on (a seek, not a replay),
    made by the tf.data service at config.data.service when one is given."""
    return data_lib.make_pretrain_iterator(
        config.data.dataset,
        config.data.split,
        groups=crop_groups(config),
        global_batch_size=config.batch_size,
        seed=config.seed,
        stride=models.backbone_stride(config.model.arch),
        flip_grid=config.data.flip_grid,
        with_labels=True,
        start_step=start_step,
        read=data_lib.ReadOptions.from_config(config.data),
        service=config.data.service,
    )


def init_train_state(config, tx, mesh):
    """Returns (graphdef, random streams, state, state shardings), the state created sharded.

    The random streams (drop path) are not part of the state: the step reseeds them from
    (seed, step); they are returned so that the step can merge a whole model.
    """

    def init():
        model = create_model(config.model, config.loss.alpha, rngs=nnx.Rngs(config.seed))
        _, params, batch_stats, rest = split_model(model)
        return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params)), rest

    graphdef = split_model(abstract_model(config.model, config.loss.alpha, config.seed))[0]
    abstract_state, abstract_rest = jax.eval_shape(init)
    shardings = sharding.param_shardings(abstract_state, mesh, config.mesh.param_sharding, config.mesh.rules)
    rest_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_rest)
    state, rest = jax.jit(init, out_shardings=(shardings, rest_shardings))()
    return graphdef, rest, state, shardings


@dataclasses.dataclass
class Run:
    """The parts of a pre-training run, ready for the loop."""

    mesh: Any
    iterator: Any
    loss: losses.LossConfig
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    graphdef: Any
    random_streams: Any
    state: TrainState
    shardings: Any
    checkpointer: Checkpointer
    start_step: int
    total_steps: int
    steps_per_epoch: int
    resumed: bool
    skipped: list = dataclasses.field(default_factory=list)  # (step, why) of damaged checkpoints passed over


def _check_init_weights(config) -> None:
    """Raises FileNotFoundError when config.model.init_weights names nothing (checked before
    any data is touched; "release:NAME" is downloaded here, once)."""
    path = weights_lib.resolve(config.model.init_weights, as_file=True)
    if not path:
        return
    if release.is_release_file(path):
        if not workdir_lib.absolute(path).exists():
            raise FileNotFoundError(
                f"config.model.init_weights={path!r} does not exist: give an existing "
                f"{' / '.join(torch_io.TORCH_SUFFIXES)} file or a workdir."
            )
    elif not workdir_lib.is_workdir(path):
        raise FileNotFoundError(
            f"config.model.init_weights={path!r} is neither a weights file ({', '.join(torch_io.TORCH_SUFFIXES)}) "
            "nor a workdir with a config.json: check the path."
        )


def check_resume(config, workdir, step: int) -> None:
    """Raises ValueError when resuming workdir at step under config would change what the run
    computes (config.RESUME_KEYS) and config.allow_config_change is off; with it on, logs the
    changes and writes config as config.<step>.json beside the earlier ones."""
    changes = resume_changes(config, workdir, step)
    if changes:
        save_resume_changes(config, workdir, step, changes)


def resume_changes(config, workdir, step: int) -> str | None:
    """Returns the config changes that resuming workdir at step under config makes, listed
    ("key: old -> new, ..."), or None; raises ValueError when they are refused. Writes nothing."""
    if config.total_steps is not None and config.total_steps < step:
        raise ValueError(
            f"config.total_steps={config.total_steps} is below the step {workdir_lib.absolute(workdir)} "
            f"is at ({step}): give a total of {step} or more, or use another --workdir."
        )
    if not workdir_lib.is_workdir(workdir):
        return None  # checkpoints without config.json: nothing to compare with
    # The keys that define the state's shapes are the checkpoint's to refuse, with its own message.
    changes = config_lib.resume_changes(workdir_lib.load_config(workdir, step), config, ignore=MODEL_KEYS)
    if not changes:
        return None
    listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
    if not config.allow_config_change:
        raise ValueError(
            f"Resuming {workdir_lib.absolute(workdir)} at step {step} with another config ({listed}) would change "
            "what the run computes: run with the config it was started with (config.json), use another "
            "--workdir, or pass --config.allow_config_change=True to go on with the new one."
        )
    return listed


def save_resume_changes(config, workdir, step: int, listed: str) -> None:
    """Writes config as config.<step>.json and says which changes (listed) it makes."""
    path = workdir_lib.save_resume_config(workdir, config, step)
    logging.warning("Resuming at step %d with config changes (%s); the new config is %s.", step, listed, path)
    print(f"Config changed on resume at step {step}: {listed} (written to {path}).", flush=True)


def _check_classes(config, iterator) -> None:
    """Raises ValueError when the pre-training data has more classes than the online
    classifier has outputs (labels >= config.model.num_classes)."""
    if iterator.num_classes > config.model.num_classes:
        raise ValueError(
            f"config.model.num_classes={config.model.num_classes} but the dataset {config.data.dataset!r} has "
            f"{iterator.num_classes} classes (labels 0..{iterator.num_classes - 1}): set "
            f"--config.model.num_classes={iterator.num_classes}."
        )


def build_run(config, workdir) -> Run:
    """Returns the run config describes in workdir: resumed from its newest checkpoint that
    restores and verifies when there is one, else fresh (from config.model.init_weights when
    set) with config.json written. The config has passed check_config."""
    mesh = sharding.make_mesh(config.mesh.num_devices)
    checkpointer = Checkpointer(workdir, model_meta(config), keep=config.checkpoint.keep)
    try:
        latest, changes = checkpointer.latest_step(), None
        if latest is None:
            _check_init_weights(config)
        else:
            changes = resume_changes(config, workdir, latest)
        return _build(config, workdir, mesh, checkpointer, latest, changes)
    except BaseException:
        checkpointer.close()
        raise


def _build(config, workdir, mesh, checkpointer, latest, changes: str | None) -> Run:
    # Nothing is written (config.json, config.<step>.json) until every check has passed: a
    # refused run leaves the workdir as it was.
    start = 0 if latest is None else latest
    iterator = pretrain_iterator(config, start)
    try:
        _check_classes(config, iterator)
        steps_per_epoch, total = schedule_length(config, config.data.num_examples or iterator.num_examples)
        if total < start:
            raise ValueError(
                f"config.epochs={config.epochs} gives {total} steps, below the step "
                f"{workdir_lib.absolute(workdir)} is at ({start}): give more epochs or another --workdir."
            )
        schedule, tx = make_optimizer(config, steps_per_epoch, total)
        graphdef, rest, state, shardings = init_train_state(config, tx, mesh)
        skipped = []
        if latest is not None:
            start, state, skipped = checkpointer.restore(state)
            if start != latest:  # fell back past damaged checkpoints: the data resumes there too
                iterator.close()
                iterator = pretrain_iterator(config, start)
            if changes:
                save_resume_changes(config, workdir, start, changes)
        else:
            if config.model.init_weights:
                params, batch_stats, description = release.initial_weights(
                    weights_lib.resolve(config.model.init_weights, as_file=True),
                    config,
                    state.params,
                    state.batch_stats,
                )
                state = TrainState(state.step, params, batch_stats, state.opt_state)
                logging.info("Initial weights from %s", description)
            workdir_lib.save_config(workdir, config)
    except BaseException:
        iterator.close()
        raise
    return Run(
        mesh=mesh,
        iterator=iterator,
        loss=loss_config(config),
        schedule=schedule,
        tx=tx,
        graphdef=graphdef,
        random_streams=rest,
        state=state,
        shardings=shardings,
        checkpointer=checkpointer,
        start_step=start,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        resumed=latest is not None,
        skipped=skipped,
    )
