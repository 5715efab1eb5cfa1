"""What the tests share: the tiny pre-training config (one compiled step shape) and view grouping."""

import itertools

import jax.numpy as jnp

from vicregl_jax.config import default_config


def grouped(views):
    """Returns per-view arrays (B, ...) stacked into crop groups (B, V_g, ...): runs of
    consecutive views of one shape, the layout of the pipeline, the model and the criterion."""
    if views is None:
        return None
    return [jnp.stack(list(run), axis=1) for _, run in itertools.groupby(views, key=lambda v: v.shape)]


def tiny_config(data_dir: str, **overrides):
    """Returns a config that pre-trains resnet_test on the embedded photos in seconds."""
    c = default_config()
    c.dataset = "vicregl_photos"
    c.data_dir = data_dir
    c.arch = "resnet_test"
    c.num_classes = 4  # the photos are unlabelled: the classifier sees label -1 only
    c.crops = ((64, 2, 0.3, 1.0),)  # 2 views with 2x2 grids: the smallest graph to compile
    c.mlp = "64-64"
    c.maps_mlp = "32-32"
    c.num_matches = (3, 2)
    c.batch_size = 16
    c.optimizer = "lars"
    c.base_lr = 0.5
    c.weight_decay = 1e-6
    # Tests stop runs with stop_after_steps: the schedule, baked into the compiled step, stays
    # the same for every test, so they all share one compiled program (persistent cache).
    c.total_steps = 1000
    c.epochs = 1
    c.warmup_epochs = 0
    c.log_every_steps = 1
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 5
    for key, value in overrides.items():
        c[key] = value
    return c
