"""Mesh, batch and parameter shardings (the multi-host start is vicregl_jax.distributed).

One mesh axis, "data", spans every device of every host. The batch is sharded over it; the
parameters and optimiser state are replicated, or sharded over the same axis FSDP-style
(each large array split along one dimension) when the config asks for it or names regex
rules. The mesh uses Auto axes: XLA's SPMD partitioner places most collectives, so BatchNorm
and the VICReg statistics are global with no pmean.

A train step traces under `step_context(mesh, params, param_shardings)`: the mesh is then the
context mesh of the trace, so that the models constrain their activations to the batch axis at
block boundaries (`constrain_batch`), the criterion computes its statistics with explicit
collectives, and every layer whose weight is FSDP-sharded runs as a `shard_map` that
all-gathers the weight in the compute dtype just before use (again in the backward pass
instead of keeping it) and reduce-scatters its gradient (`gathered_dot_general`,
`gathered_conv_general_dilated`). Outside that context (evaluation, tests of single modules)
all of these are the plain operations.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
# Blocks run by a scan keep their parameters stacked under an attribute of this name
# (models/stack.py, BlockStack): axis 0 counts the blocks and is never sharded, the optimiser
# treats every block's slice as its own parameter, and layout.py maps block j of the stack to
# the release's per-block names.
STACKED = "stacked"
# Parameters of fewer elements stay replicated under FSDP: biases, norms, small kernels.
FSDP_MIN_SIZE = 2**18


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


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_name(path) -> str:
    return "/".join(_key_name(key) for key in path)


def is_stacked(path) -> bool:
    """Returns whether the pytree path leads to a stacked parameter (axis 0 counts blocks)."""
    return any(_key_name(key) == STACKED for key in path)


def fsdp_spec(shape: Sequence[int], axis_size: int, min_size: int = FSDP_MIN_SIZE, *, stacked: bool = False) -> P:
    """Returns the PartitionSpec that splits the largest dimension divisible by axis_size, or
    replicates arrays smaller than min_size elements (biases, norms, small kernels).

    stacked: axis 0 counts the blocks of a scan; it is never split (each block's slice is
    what a layer gathers).
    """
    if int(np.prod(shape, dtype=np.int64)) < min_size or axis_size == 1:
        return P()
    first = 1 if stacked else 0
    order = sorted(range(first, len(shape)), key=lambda d: -shape[d])
    for d in order:
        if shape[d] % axis_size == 0:
            spec = [None] * len(shape)
            spec[d] = DATA_AXIS
            return P(*spec)
    return P()


def param_shardings(
    tree, mesh, mode: str = "replicated", rules: Sequence[tuple[str, str]] = (), *, min_size: int = FSDP_MIN_SIZE
):
    """Returns a pytree of NamedShardings for the parameter / optimiser-state tree.

    mode "replicated": every array whole on every device. mode "fsdp": arrays of min_size+
    elements split along their largest dimension divisible by the mesh size (never the block
    axis of stacked parameters). rules: (regex, "fsdp" | "replicated") pairs matched against
    the "/"-joined path, the first match winning, applied before the mode's default.
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
            return NamedSharding(mesh, fsdp_spec(shape, axis_size, min_size, stacked=is_stacked(path)))
        if choice == "replicated":
            return NamedSharding(mesh, P())
        raise ValueError(f"Sharding rule for {name!r} says {choice!r}; use 'fsdp' or 'replicated'.")

    return jax.tree_util.tree_map_with_path(spec_for, tree)


# --------------------------------------------------------------------------------------------
# The context a train step traces under
# --------------------------------------------------------------------------------------------

# {weight shape: PartitionSpec} of the FSDP-sharded weights of the step being traced.
_GATHERED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vicregl_jax_gathered_weights", default=None)


def weight_specs(params, shardings) -> dict[tuple, P]:
    """Returns {shape: spec} of the sharded leaves of params (arrays or ShapeDtypeStructs)
    under shardings (a matching tree of NamedShardings): the weights a layer must gather.

    A stacked parameter also gives its per-block slice (its shape and spec without axis 0),
    which is what a layer sees inside the scan over blocks. Weights are told apart by shape:
    where two of one shape are sharded differently the last one's spec is used for both, which
    costs the other a reshard, not its values.
    """
    specs = {}
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings)):
        spec = tuple(getattr(sharding, "spec", ()))
        if not any(spec):
            continue
        shape = tuple(leaf.shape)
        specs[shape] = P(*spec, *([None] * (len(shape) - len(spec))))
        if is_stacked(path):
            specs[shape[1:]] = P(*specs[shape][1:])
    return specs


@contextlib.contextmanager
def step_context(mesh, params=None, shardings=None):
    """Traces the code inside on mesh: activations constrained to the batch axis, statistics
    with explicit collectives, and the weights of `params` that `shardings` splits gathered
    just in time (see the module's docstring). Use inside the function given to jax.jit."""
    gathered = weight_specs(params, shardings) if params is not None else {}
    token = _GATHERED.set(gathered)
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            yield
    finally:
        _GATHERED.reset(token)


def on_mesh(
    fn: Callable, mesh, param_shardings=None, params_argnum: int = 0, params_field: str | None = "params"
) -> Callable:
    """Returns fn traced under step_context(mesh, ...), for jax.jit: the parameters are
    argument params_argnum (its attribute params_field, e.g. a TrainState's params)."""

    def traced(*args, **kwargs):
        params = None
        if param_shardings is not None:
            params = args[params_argnum]
            params = getattr(params, params_field) if params_field else params
        with step_context(mesh, params, param_shardings):
            return fn(*args, **kwargs)

    return traced


def data_axis_size() -> int:
    """Returns the size of the context mesh's data axis (1 outside step_context)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[DATA_AXIS]


def constrain_batch(x: jax.Array) -> jax.Array:
    """Returns x constrained to be sharded over the context mesh's data axis along its first
    dimension (no-op outside step_context or when that dimension does not divide)."""
    size = data_axis_size()
    if size == 1 or x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, P(DATA_AXIS))


def per_example(fn: Callable) -> Callable:
    """Returns fn, a function of batch-first arrays that treats every example alone, run
    where each device's examples are (a shard_map over the batch) inside step_context, so that
    XLA cannot gather the batch for it (it does for top_k); fn itself elsewhere."""

    def mapped(*args):
        size = data_axis_size()
        if size == 1 or any(a.shape[0] % size for a in jax.tree.leaves(args)):
            return fn(*args)
        return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=P(DATA_AXIS), out_specs=P(DATA_AXIS))(
            *args
        )

    return mapped


def _gathered_spec(lhs: jax.Array, rhs: jax.Array) -> P | None:
    spec = (_GATHERED.get() or {}).get(tuple(rhs.shape))
    size = data_axis_size()
    if spec is None or size == 1 or lhs.shape[0] % size:
        return None
    return spec


def _gather(w_local: jax.Array, spec: P) -> jax.Array:
    """Returns the whole weight from this device's shard (inside shard_map), named so that
    the backward pass gathers it again instead of keeping it."""
    for axis, name in enumerate(spec):
        if name is not None:
            w_local = jax.lax.all_gather(w_local, name, axis=axis, tiled=True)
    return checkpoint_name(w_local, "fsdp_gathered_weight")


def with_gathered_weight(op: Callable[[jax.Array, jax.Array], jax.Array], lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """Returns op(lhs, rhs) for an activation lhs (batch first) and a weight rhs; when rhs is
    an FSDP-sharded weight of the step being traced, as a shard_map over the batch that
    all-gathers rhs (in its dtype, the compute dtype) and reduce-scatters its gradient."""
    spec = _gathered_spec(lhs, rhs)
    if spec is None:
        return op(lhs, rhs)

    def local(x, w):
        return op(x, _gather(w, spec))

    # The gathered weight is recomputed (gathered again) for the backward pass, not saved.
    policy = jax.checkpoint_policies.save_anything_except_these_names("fsdp_gathered_weight")
    local = jax.checkpoint(local, policy=policy)
    return jax.shard_map(
        local, mesh=jax.sharding.get_abstract_mesh(), in_specs=(P(DATA_AXIS), spec), out_specs=P(DATA_AXIS)
    )(lhs, rhs)


def gathered_dot_general(lhs, rhs, *args, out_sharding=None, **kwargs) -> jax.Array:
    """Returns jax.lax.dot_general(lhs, rhs, *args, **kwargs) with an FSDP-sharded rhs gathered
    just in time (the `dot_general` of nnx.Linear). out_sharding (nnx passes None) is dropped:
    inside the shard_map the result is per device."""
    del out_sharding
    return with_gathered_weight(lambda x, w: jax.lax.dot_general(x, w, *args, **kwargs), lhs, rhs)


def gathered_conv_general_dilated(lhs, rhs, *args, out_sharding=None, **kwargs) -> jax.Array:
    """Returns jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs) with an FSDP-sharded
    kernel rhs gathered just in time (the `conv_general_dilated` of nnx.Conv); out_sharding
    as in gathered_dot_general."""
    del out_sharding
    return with_gathered_weight(lambda x, w: jax.lax.conv_general_dilated(x, w, *args, **kwargs), lhs, rhs)
