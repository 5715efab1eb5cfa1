"""Per-host numpy batches -> global jax.Arrays sharded over the batch axis of a mesh."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np


def to_global_batch(batch: Any, mesh: jax.sharding.Mesh, data_axis: str = "data") -> Any:
    """Returns the batch (any pytree of per-host arrays, batch axis first) as global jax.Arrays.

    Each host passes its own local batch; the global array concatenates the hosts' batches
    in process order along axis 0 and is sharded over the mesh axis `data_axis`
    (`jax.make_array_from_process_local_data`).
    """
    if data_axis not in mesh.axis_names:
        raise ValueError(
            f"mesh has no axis {data_axis!r} (axes: {mesh.axis_names}): pass the name of the "
            "batch axis as data_axis="
        )

    def to_global(local):
        local = np.asarray(local)
        spec = jax.sharding.PartitionSpec(data_axis, *([None] * (local.ndim - 1)))
        sharding = jax.sharding.NamedSharding(mesh, spec)
        return jax.make_array_from_process_local_data(sharding, local)

    return jax.tree_util.tree_map(to_global, batch)
