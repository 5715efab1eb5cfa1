"""The Python side of every iterator: batches in step order, failure accounting, clean shutdown.

`BatchIterator` counts the failures each batch of the stream carries (unreadable apart from
undecodable, the first few named), and stops with `PipelineError` when more than
`max_failure_share` of the last `failure_window` images failed, or when every try of one
example failed. Batches that a tf.data service delivers out of order are put back in step
order. Every open iterator is closed at interpreter exit (one registry for all of them).
"""

from __future__ import annotations

import atexit
import collections
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import tensorflow as tf
from absl import logging

from vicregl_jax.data import sources
from vicregl_jax.data.options import Hosts, ReadOptions
from vicregl_jax.data.stream import MAX_ATTEMPTS


class PipelineError(RuntimeError):
    """The input pipeline cannot go on (too many unreadable or undecodable images)."""


# Open iterators, closed before the interpreter shuts down: tf.data's iterator destructor
# waits for its Python (numpy_function) calls, which cannot run any more once finalisation
# has begun: the process would hang after an error instead of exiting.
_OPEN_ITERATORS: weakref.WeakSet[BatchIterator] = weakref.WeakSet()


@atexit.register
def _close_open_iterators():
    for iterator in list(_OPEN_ITERATORS):
        iterator.close()


class BatchIterator:
    """Python iterator over per-host batches (dicts of numpy arrays).

    Attributes: `step` (index of the next batch), `num_skipped` (images replaced or masked
    in the batches delivered so far), of which `num_unreadable` (read errors, after retries)
    and `num_undecodable`; `failed_examples` (the first few, by name); `num_examples` and
    `num_classes` of the dataset (0 classes when unlabelled), `steps` (batches it yields,
    None when endless; also `len()`), and `dataset`, the underlying tf.data.Dataset.
    `close()` (or leaving a `with` block) stops its threads.
    """

    MAX_NAMED_FAILURES = 5

    def __init__(
        self,
        dataset: tf.data.Dataset,
        start_step: int,
        source: sources.ImageSource,
        steps: int | None = None,
        *,
        read: ReadOptions = ReadOptions(),
        give_up: bool = True,
        process_index: int = 0,
        global_batch: int = 0,
        reorder: bool = False,
    ):
        self.dataset = dataset
        self.step = start_step
        self.num_unreadable = self.num_undecodable = 0
        self.failed_examples: list[str] = []
        self.num_examples = source.num_examples
        self.num_classes = source.num_classes
        self.steps = steps
        self._source = source
        self._read = read
        self._give_up = give_up
        self._process_index = process_index
        self._global_batch = global_batch
        self._reorder = reorder
        self._waiting: dict[int, dict] = {}  # batches that arrived early (tf.data service)
        self._window: collections.deque = collections.deque()  # (images tried, failures) per batch
        self._window_tried = self._window_failed = 0
        self._lock = threading.Lock()
        self._iterator = iter(dataset.as_numpy_iterator())
        _OPEN_ITERATORS.add(self)

    @property
    def num_skipped(self) -> int:
        return self.num_unreadable + self.num_undecodable

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stops the pipeline's threads (waits for their calls in flight)."""
        with self._lock:
            self._iterator = None
        _OPEN_ITERATORS.discard(self)

    def _next_raw(self) -> dict:
        if self._iterator is None:
            raise StopIteration
        if not self._reorder:
            return next(self._iterator)
        # The tf.data service delivers whole batches in any order: put them back in step order.
        while self.step not in self._waiting:
            batch = next(self._iterator)
            step = int(batch["position"][0]) // self._global_batch
            self._waiting[step] = batch
            if len(self._waiting) > 64:
                raise PipelineError(
                    f"batch {self.step} never came from the tf.data service while "
                    f"{len(self._waiting)} later ones did (a worker lost?): restart the run, "
                    "which resumes from its last checkpoint."
                )
        return self._waiting.pop(self.step)

    def __next__(self) -> dict[str, Any]:
        try:
            batch = self._next_raw()
            self._account(batch)
        except StopIteration:
            self.close()
            raise
        except BaseException:
            # Stop the threads now, while they can still finish their Python calls.
            self.close()
            raise
        batch.pop("position", None)
        self.step += 1
        return batch

    def _account(self, batch: dict) -> None:
        """Counts the failures of a batch, names the first ones, and applies the give-up rule."""
        read_failures, decode_failures = batch.pop("read_failures"), batch.pop("decode_failures")
        failed_index, failed_read = batch.pop("failed_index"), batch.pop("failed_read")
        unreadable, undecodable = int(read_failures.sum()), int(decode_failures.sum())
        failures = unreadable + undecodable
        self.num_unreadable += unreadable
        self.num_undecodable += undecodable
        if failures:
            for index, was_read in zip(failed_index, failed_read):
                if index >= 0 and len(self.failed_examples) < self.MAX_NAMED_FAILURES:
                    kind = "unreadable" if was_read else "undecodable"
                    self.failed_examples.append(f"{self._source.describe(int(index))} ({kind})")
            logging.log_every_n_seconds(
                logging.WARNING,
                "Host %d: %d unreadable and %d undecodable images skipped so far in %s (first: %s).",
                30,
                self._process_index,
                self.num_unreadable,
                self.num_undecodable,
                self._source.name,
                ", ".join(self.failed_examples),
            )
        if not self._give_up:
            return
        exhausted = (read_failures + decode_failures) >= MAX_ATTEMPTS
        if exhausted.any():
            raise PipelineError(
                f"all {MAX_ATTEMPTS} images tried for one example of {self._source.name} failed "
                f"to decode or to read (e.g. {', '.join(self.failed_examples)}): is the dataset "
                "corrupt, not images, or its storage unreachable?"
            )
        self._window.append((len(read_failures) + failures, failures))
        self._window_tried += len(read_failures) + failures
        self._window_failed += failures
        window = self._read.failure_window
        while self._window and self._window_tried - self._window[0][0] >= window:
            tried, failed = self._window.popleft()
            self._window_tried -= tried
            self._window_failed -= failed
        limit = self._read.max_failure_share * window
        if self._window_failed > limit:
            raise PipelineError(
                f"{self._window_failed} of the last {min(self._window_tried, window)} images of "
                f"{self._source.name} could not be used ({self.num_unreadable} unreadable and "
                f"{self.num_undecodable} undecodable so far on host {self._process_index}), more than "
                f"max_failure_share={self._read.max_failure_share} of {window}: first failing: "
                f"{', '.join(self.failed_examples)}. Remove or repair these files, or raise "
                "max_failure_share."
            )

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("this iterator is endless: it has no len()")
        return self.steps

    def stats(self) -> dict[str, int]:
        """Returns the step, the counts of skipped images (all, unreadable, undecodable) and
        the dataset size."""
        return {
            "step": self.step,
            "num_skipped": self.num_skipped,
            "num_unreadable": self.num_unreadable,
            "num_undecodable": self.num_undecodable,
            "num_examples": self.num_examples,
        }


def endless_iterator(
    ds: tf.data.Dataset,
    start_step: int,
    source: sources.ImageSource,
    *,
    read: ReadOptions,
    hosts: Hosts,
    global_batch: int,
    reorder: bool = False,
) -> BatchIterator:
    """Returns a BatchIterator over this host's endless batches ds from start_step, prefetched by read.prefetch."""
    return BatchIterator(
        ds.prefetch(read.prefetch),
        start_step,
        source,
        read=read,
        process_index=hosts.index,
        global_batch=global_batch,
        reorder=reorder,
    )
