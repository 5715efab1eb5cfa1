"""Input pipeline: multi-crop views with their location grids.

from vicregl_jax.data import CropGroup, make_pretrain_iterator
batches = make_pretrain_iterator("vicregl_photos", "train", seed=0, global_batch_size=32,
                                 groups=[CropGroup(224, 2, (0.08, 1.0))])
batch = next(batches)  # {"views": uint8 (...,), "draws": (...,), "grids": (...,), "label": ...}
views = augment_views(batch["views"][0], batch["draws"][0])  # colour + normalise (JAX)
"""

import os

# TensorFlow's default CPU allocator hands large blocks back to the OS, so every batch
# page-faults its fresh memory in again: on CPU that was a third of the pipeline's time.
# The BFC allocator keeps and reuses them. Read when TensorFlow first allocates: set it in
# the environment yourself if TensorFlow runs ops before this package is imported.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import importlib

from vicregl_jax.data.colour import IMAGENET_MEAN, IMAGENET_STD, augment_views  # noqa: E402
from vicregl_jax.data.global_batch import (  # noqa: E402
    MeshPrefetch,
    prefetch_to_mesh,
    sum_over_hosts,
    to_global_batch,
)
from vicregl_jax.data.grids import location_grid  # noqa: E402

# TensorFlow is imported with the first name below that is used, not with the package: the
# train step, the benchmarks and the evaluations of cached features run without it (the
# CUDA images of GPU clusters often have no TensorFlow).
_LAZY = {
    "CONVNEXT_GROUPS": "crops",
    "RESNET_GROUPS": "crops",
    "CropGroup": "crops",
    "BatchIterator": "iterator",
    "EvalImages": "pipeline",
    "PipelineError": "iterator",
    "ReadOptions": "options",
    "make_eval_iterator": "pipeline",
    "make_linear_train_iterator": "pipeline",
    "make_pretrain_iterator": "pipeline",
    "open_source": "sources",
}


# Modules imported on first use the same way (they import TensorFlow).
_LAZY_MODULES = ("segmentation",)


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"vicregl_jax.data.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(f"vicregl_jax.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchIterator",
    "CONVNEXT_GROUPS",
    "CropGroup",
    "EvalImages",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MeshPrefetch",
    "PipelineError",
    "RESNET_GROUPS",
    "ReadOptions",
    "augment_views",
    "location_grid",
    "make_eval_iterator",
    "make_linear_train_iterator",
    "make_pretrain_iterator",
    "open_source",
    "prefetch_to_mesh",
    "sum_over_hosts",
    "to_global_batch",
]


def __dir__():
    return sorted(__all__)
