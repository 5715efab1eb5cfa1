"""vicregl_jax: VICRegL (Bardes, Ponce, LeCun 2022) in JAX/Flax.

model, config = vicregl_jax.load("resnet50_alpha0.9")   # the release's weights, by name
out = vicregl_jax.features(model, images)               # global and dense features
"""

import importlib

__version__ = "0.1.0"

# Imported on first use, not with the package: `import vicregl_jax.data` (tf.data service
# workers, the benchmarks) stays free of Orbax and the model code.
_LAZY = {"load": "weights", "features": "extract", "Extractor": "extract"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"vicregl_jax.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Extractor", "__version__", "features", "load"]
