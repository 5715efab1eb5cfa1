"""Coordination between the processes of a run, through jax.distributed's key-value store.

A process publishes a value under a key and the others wait for it (`publish`, `wait_for`);
a process that stops on an error says why (`report_failure`), so that the others, whose next
collective fails with a bare timeout, can name the real cause (`peer_failures`); and work that
one process makes cheap for the rest runs on process 0 first (`first_process_then_others`).
On one process every helper is a no-op or simply runs the work. Nothing here starts JAX's
distributed system: that is `distributed.start`'s job, above this module.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import jax
from etils import epath
from jax._src import distributed as jax_distributed

T = TypeVar("T")


# ------------------------------------------------------------------------------------------
# One process does a job, the others wait (the coordination service's key-value store)
# ------------------------------------------------------------------------------------------


def coordination_client():
    """Returns jax.distributed's coordination client when this run spans processes, else None."""
    if jax.process_count() == 1:
        return None
    return jax_distributed.global_state.client


def publish(key: str, value: str) -> None:
    """Sets key to value in the coordination service, for every process to read."""
    coordination_client().key_value_set(key, value)


def wait_for(key: str, timeout_s: float) -> str:
    """Returns the value another process publishes under key, waiting up to timeout_s for it
    (raises TimeoutError after)."""
    try:
        return coordination_client().blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as error:  # noqa: BLE001 - the client raises a bare XlaRuntimeError
        if "DEADLINE_EXCEEDED" in str(error) or "timed out" in str(error).lower():
            raise TimeoutError(f"no process published {key!r} within {timeout_s:.0f} s") from error
        raise


# A process that stops on an error says why, so that the others, whose next collective then
# fails with a bare timeout, can name the real cause.
FAILURE_PREFIX = "vicregl_jax/failed/"
PEER_FAILURE_WAIT_S = 120.0


def report_failure(error: BaseException) -> None:
    """Publishes this process's fatal error for the other processes (no-op on one process)."""
    client = coordination_client()
    if client is None:
        return
    try:
        client.key_value_set(f"{FAILURE_PREFIX}{jax.process_index()}", f"{type(error).__name__}: {error}")
    except Exception:  # noqa: BLE001 - the service may be gone already; the error is raised anyway
        pass


def peer_failures(wait_s: float = 0.0) -> dict[int, str]:
    """Returns {process index: error} of the other processes that reported a failure, waiting
    up to wait_s for a first report (a peer may still be on its way down)."""
    client = coordination_client()
    if client is None:
        return {}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            entries = client.key_value_dir_get(FAILURE_PREFIX)
        except Exception:  # noqa: BLE001 - the service itself is unreachable
            return {}
        found = {
            int(key.rsplit("/", 1)[-1]): value
            for key, value in entries
            if key.rsplit("/", 1)[-1].isdigit() and int(key.rsplit("/", 1)[-1]) != jax.process_index()
        }
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(1.0)


class PeerFailureError(RuntimeError):
    """Another process of the run stopped on an error; this one cannot go on without it."""


# ------------------------------------------------------------------------------------------
# Process 0 first, then the others
# ------------------------------------------------------------------------------------------

# How long the other processes wait for process 0 to reach a first_process_then_others call,
# and then to finish its work (preparing ImageNet from its tars takes hours).
ARRIVAL_TIMEOUT_S = 30 * 60
WORK_TIMEOUT_S = 48 * 3600


def first_process_then_others(key: str, shared_dir: str, work: Callable[[], T]) -> T:
    """Returns work()'s result, run by process 0 first and by the other processes after it:
    for work that process 0 makes cheap for the rest (preparing a dataset into a directory the
    processes share; the others then find it done). No file lock is needed, so it holds on
    gs:// too. A process that does not see process 0's shared_dir (a host-local directory of
    the same name) runs work() without waiting; on one process, work() simply runs.

    Every process of the run must call it with the same key; process 0's failure is raised on
    every process.
    """
    if coordination_client() is None:
        return work()
    marker_name = ".vicregl_jax_first." + re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    if jax.process_index() == 0:
        token = f"{marker_name}.{uuid.uuid4().hex}"
        marker = epath.Path(shared_dir) / token
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)
        publish(f"vicregl_jax/first/{key}/marker", token)
        try:
            result = work()
        except BaseException as error:
            publish(f"vicregl_jax/first/{key}/done", f"error: {type(error).__name__}: {error}")
            marker.unlink(missing_ok=True)
            raise
        # Published before the marker goes: a process that finds no marker and no answer is on
        # another directory, never one that came too late.
        publish(f"vicregl_jax/first/{key}/done", "ok")
        marker.unlink(missing_ok=True)
        return result
    try:
        token = wait_for(f"vicregl_jax/first/{key}/marker", ARRIVAL_TIMEOUT_S)
    except TimeoutError:
        logging.warning("Process 0 did not start %s within %d s: doing it here.", key, ARRIVAL_TIMEOUT_S)
        return work()
    if not (epath.Path(shared_dir) / token).exists():
        done = _published(f"vicregl_jax/first/{key}/done")
        if done is None:  # still running on process 0, in a directory this host does not see
            logging.warning("%s is not process 0's directory (host-local?): doing %s here too.", shared_dir, key)
            return work()
    else:
        print(f"vicregl_jax: process {jax.process_index()} waits for process 0 to finish {key}", flush=True)
        done = wait_for(f"vicregl_jax/first/{key}/done", WORK_TIMEOUT_S)
    if done != "ok":
        raise RuntimeError(f"process 0 failed at {key}: {done.removeprefix('error: ')}")
    return work()


def _published(key: str) -> str | None:
    """Returns the value published under key if there is one yet, else None."""
    try:
        return coordination_client().key_value_try_get(key)
    except Exception:  # noqa: BLE001 - NOT_FOUND comes as a bare XlaRuntimeError
        return None
