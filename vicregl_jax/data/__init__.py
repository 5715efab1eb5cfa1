"""Input pipeline: multi-crop views with their location grids (SPEC.md section 1).

    from vicregl_jax.data import CropGroup, make_pretrain_iterator
    batches = make_pretrain_iterator("vicregl_photos", "train", seed=0, global_batch_size=32,
                                     groups=[CropGroup(224, 2, (0.08, 1.0))])
    batch = next(batches)  # {"views": (...,), "grids": (...,), "label": ...}
"""
import os

# TensorFlow's default CPU allocator hands large blocks back to the OS, so every batch
# page-faults its fresh memory in again: on CPU that was a third of the pipeline's time.
# The BFC allocator keeps and reuses them. Read when TensorFlow first allocates: set it in
# the environment yourself if TensorFlow runs ops before this package is imported.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

from vicregl_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from vicregl_jax.data.crops import (  # noqa: E402
    CONVNEXT_GROUPS,
    RESNET_GROUPS,
    CropGroup,
    location_grid,
)
from vicregl_jax.data.global_batch import to_global_batch  # noqa: E402
from vicregl_jax.data.pipeline import (  # noqa: E402
    BatchIterator,
    make_eval_iterator,
    make_pretrain_iterator,
)

__all__ = [
    "BatchIterator",
    "CONVNEXT_GROUPS",
    "CropGroup",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESNET_GROUPS",
    "location_grid",
    "make_eval_iterator",
    "make_pretrain_iterator",
    "to_global_batch",
]
