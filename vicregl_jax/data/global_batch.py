"""Per-host numpy batches -> global jax.Arrays sharded over the batch axis of a mesh, put
there ahead of the step by a background thread."""

from __future__ import annotations

import queue
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_global_batch(batch: Any, mesh: jax.sharding.Mesh, data_axis: str = "data") -> Any:
    """Returns the batch (any pytree of per-host arrays, batch axis first) as global jax.Arrays.

    Each host passes its own local batch; the global array concatenates the hosts' batches
    in process order along axis 0 and is sharded over the mesh axis `data_axis`
    (`jax.make_array_from_process_local_data`).
    """
    if data_axis not in mesh.axis_names:
        raise ValueError(
            f"mesh has no axis {data_axis!r} (axes: {mesh.axis_names}): pass the name of the batch axis as data_axis="
        )

    def to_global(local):
        local = np.asarray(local)
        spec = jax.sharding.PartitionSpec(data_axis, *([None] * (local.ndim - 1)))
        sharding = jax.sharding.NamedSharding(mesh, spec)
        return jax.make_array_from_process_local_data(sharding, local)

    return jax.tree_util.tree_map(to_global, batch)


_DONE = object()


class MeshPrefetch:
    """Iterator of global batches put on the mesh by a background thread, `size` ahead.

    `next()` returns what `to_global_batch(next(batches), mesh)` would, but the host-to-device
    copies of the next batches run while the training thread computes: it never waits for
    one. An error of the pipeline is raised by the `next()` that reaches it; the end of
    `batches` ends this iterator. `close()` (or leaving a `with` block) stops the thread and
    closes `batches`; `stats()` and the other attributes of `batches` (step, num_skipped...)
    describe the batches delivered so far, not those in flight.
    """

    def __init__(self, batches, mesh: jax.sharding.Mesh, size: int = 2, data_axis: str = "data"):
        if size < 1:
            raise ValueError(f"size={size}: give the number of batches to keep in flight, e.g. 2.")
        self._batches = batches
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._delivered: dict[str, Any] = self._snapshot()
        self._thread = threading.Thread(
            target=self._fill, args=(mesh, data_axis), name="vicregl_mesh_prefetch", daemon=True
        )
        self._thread.start()

    def _snapshot(self) -> dict[str, Any]:
        stats = getattr(self._batches, "stats", None)
        return stats() if callable(stats) else {}

    def _put(self, item) -> bool:
        """Puts item in the queue unless asked to stop; returns whether it was put."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, mesh, data_axis) -> None:
        try:
            while not self._stop.is_set():
                try:
                    local = next(self._batches)
                except StopIteration:
                    break
                item = (to_global_batch(local, mesh, data_axis), self._snapshot())
                if not self._put(item):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(error)
            return
        self._put(_DONE)

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._delivered = item
        return batch

    def stats(self) -> dict[str, Any]:
        """Returns the pipeline's stats as of the last batch delivered."""
        return dict(self._delivered)

    def __getattr__(self, name):
        # step, num_skipped, num_examples...: as of the batches delivered.
        delivered = self.__dict__.get("_delivered", {})
        if name in delivered:
            return delivered[name]
        return getattr(self.__dict__["_batches"], name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stops the thread (after the call to the pipeline it is in) and closes the pipeline."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        while thread.is_alive():
            try:  # unblock a put
                self._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
        closer = getattr(self._batches, "close", None)
        if callable(closer):
            closer()


def prefetch_to_mesh(batches, mesh: jax.sharding.Mesh, size: int = 2, data_axis: str = "data") -> MeshPrefetch:
    """Returns an iterator of the batches as global arrays on the mesh, `size` put ahead by a thread."""
    return MeshPrefetch(batches, mesh, size, data_axis)


def sum_over_hosts(counts: dict[str, int]) -> dict[str, int]:
    """Returns integer counts summed over all processes (a collective: every process calls it
    at the same point, e.g. at logging steps)."""
    if jax.process_count() == 1:
        return dict(counts)
    keys = sorted(counts)
    local = np.asarray([counts[k] for k in keys], np.int64)
    total = multihost_utils.process_allgather(local).reshape(-1, len(keys)).sum(axis=0)
    return {k: int(v) for k, v in zip(keys, total)}
