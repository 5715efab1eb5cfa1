"""Mesh, batch and parameter shardings (the multi-host start is vicregl_jax.distributed).

One mesh axis, "data", spans every device of every host. The batch is sharded over it; the
parameters and optimiser state are replicated, or sharded over the same axis FSDP-style
(each large array split along one dimension, gathered by XLA where a layer needs it) when the
config asks for it or names regex rules. The mesh uses Auto axes: XLA's SPMD partitioner
places the collectives, so BatchNorm and the VICReg statistics are global with no pmean.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """Returns a 1-D ("data",) mesh over the first num_devices devices (all by default)."""
    n = num_devices or jax.device_count()
    if n > jax.device_count():
        raise ValueError(f"config.mesh.num_devices={n} but only {jax.device_count()} devices are visible.")
    devices = jax.devices()[:n]
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh) -> NamedSharding:
    """Returns the sharding of arrays whose leading axis is the global batch."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
    """Returns the sharding of an array held whole on every device."""
    return NamedSharding(mesh, P())


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], axis_size: int, min_size: int = 2**18) -> P:
    """Returns the PartitionSpec that splits the largest dimension divisible by axis_size, or
    replicates arrays smaller than min_size elements (biases, norms, small kernels)."""
    if int(np.prod(shape, dtype=np.int64)) < min_size or axis_size == 1:
        return P()
    order = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in order:
        if shape[d] % axis_size == 0:
            spec = [None] * len(shape)
            spec[d] = DATA_AXIS
            return P(*spec)
    return P()


def param_shardings(tree, mesh, mode: str = "replicated", rules: Sequence[tuple[str, str]] = ()):
    """Returns a pytree of NamedShardings for the parameter / optimiser-state tree.

    mode "replicated": every array whole on every device. mode "fsdp": arrays of 2**18+
    elements split along their largest dimension divisible by the mesh size. rules: (regex,
    "fsdp" | "replicated") pairs matched against the "/"-joined path, the first match winning,
    applied before the mode's default.
    """
    if mode not in ("replicated", "fsdp"):
        raise ValueError(f"config.mesh.param_sharding={mode!r}; use 'replicated' or 'fsdp'.")
    compiled = [(re.compile(pattern), what) for pattern, what in rules]
    axis_size = mesh.shape[DATA_AXIS]

    def spec_for(path, leaf):
        shape = getattr(leaf, "shape", ())
        name = _path_name(path)
        choice = mode
        for pattern, what in compiled:
            if pattern.search(name):
                choice = what
                break
        if choice == "fsdp":
            return NamedSharding(mesh, fsdp_spec(shape, axis_size))
        if choice == "replicated":
            return NamedSharding(mesh, P())
        raise ValueError(f"Sharding rule for {name!r} says {choice!r}; use 'fsdp' or 'replicated'.")

    return jax.tree_util.tree_map_with_path(spec_for, tree)
