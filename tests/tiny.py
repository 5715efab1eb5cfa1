"""What the tests share: the tiny pre-training config (one compiled step shape), view grouping,
and a workdir's checkpoint read back as numpy arrays."""

import itertools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vicregl_jax import workdir as workdir_lib
from vicregl_jax.checkpoint import Checkpointer
from vicregl_jax.config import default_config
from vicregl_jax.model_config import model_meta


def grouped(views):
    """Returns per-view arrays (B, ...) stacked into crop groups (B, V_g, ...): runs of
    consecutive views of one shape, the layout of the pipeline, the model and the criterion."""
    if views is None:
        return None
    return [jnp.stack(list(run), axis=1) for _, run in itertools.groupby(views, key=lambda v: v.shape)]


def tiny_config(data_dir: str, overrides: dict | None = None):
    """Returns a config that pre-trains resnet_test on the embedded photos in seconds; overrides
    maps dotted keys ("optim.name") to values."""
    c = default_config()
    c.data.dataset = "vicregl_photos"
    c.data.data_dir = data_dir
    c.data.crops = ((64, 2, 0.3, 1.0),)  # 2 views with 2x2 grids: the smallest graph to compile
    c.model.arch = "resnet_test"
    c.model.num_classes = 4  # the photos are unlabelled: the classifier sees label -1 only
    c.model.mlp = "64-64"
    c.model.maps_mlp = "32-32"
    c.loss.num_matches = (3, 2)
    c.batch_size = 16
    c.optim.name = "lars"
    c.optim.base_lr = 0.5
    c.optim.weight_decay = 1e-6
    c.optim.warmup_epochs = 0
    # Tests stop runs with stop_after_steps: the schedule, baked into the compiled step, stays
    # the same for every test, so they all share one compiled program (persistent cache).
    c.total_steps = 1000
    c.epochs = 1
    c.log_every_steps = 1
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 5
    c.update_from_flattened_dict(dict(overrides or {}))
    return c


def copy_of(trained, tmp_path, name="run"):
    """Returns a copy of the shared trained workdir (conftest's `trained`) under tmp_path."""
    target = tmp_path / name
    shutil.copytree(trained, target)
    return target


def steps_on_disk(workdir):
    """Returns the steps of a workdir's checkpoint folders, sorted."""
    return sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())


def read_state(workdir, step=None):
    """Returns (step, state as nested dicts of numpy arrays) of a workdir's checkpoint."""
    config = workdir_lib.load_config(workdir)
    checkpointer = Checkpointer(workdir, model_meta(config), read_only=True)
    step = checkpointer.latest_step() if step is None else step
    # Whatever mesh wrote it: every array onto this process's first device.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = checkpointer.manager.item_metadata(step)
    target = {
        name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata[name])
        for name in ("model", "train")
    }
    restored = checkpointer.manager.restore(
        step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(tree) for name, tree in target.items()})
    )
    checkpointer.close()
    return step, jax.tree.map(np.asarray, {"model": dict(restored["model"]), "train": dict(restored["train"])})
