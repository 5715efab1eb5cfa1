"""Retried storage requests, counted for the run's log: what a bucket's bad day (429 Too Many
Requests, 503 Service Unavailable, dropped connections) looks like from inside a run.

Every library that reaches a bucket retries those by itself, with exponential backoff:

- TensorStore (Orbax's arrays): up to 32 retries, 1 s doubling to 32 s; it counts them in its
  metric /tensorstore/kvstore/gcs/retries, read here.
- google-cloud-storage (Orbax listing and deleting steps): google.api_core's Retry, 1 s
  doubling to 60 s for up to 120 s; it logs each retry at DEBUG on the logger
  "google.api_core.retry", counted here (and not passed on: the count stands for them).
- TensorFlow's gs:// file system (config, metrics, summaries, the lock, Orbax's metadata,
  folder datasets): up to 10 retries, about 1 s doubling to 32 s (GCS_RETRY_CONFIG_MAX_RETRIES,
  GCS_RETRY_CONFIG_INIT_DELAY_TIME_US, GCS_RETRY_CONFIG_MAX_DELAY_TIME_US change them). It
  cannot be asked for a count; main.py has it log each retry on stderr ("The operation failed
  and will be automatically retried in ... (attempt N out of 10)") through TF_CPP_VMODULE.
- ArrayRecord's reader (google-cloud-cpp): retries for up to 15 minutes, silently; a read that
  still fails is retried by the data pipeline (vicregl_jax.data.sources), which counts it here.

`RetryCount` gathers the counts that can be read in the process; the training loop logs what
changed since its last log step, and writes the total as the `storage_retries` metric.
"""

from __future__ import annotations

import logging
import threading

import tensorstore as ts

API_CORE_LOGGER = "google.api_core.retry"
TENSORSTORE_METRIC = "/tensorstore/kvstore/gcs/retries"

_lock = threading.Lock()
_counts = {"google-cloud-storage": 0, "data reads": 0}


_LOG = logging.getLogger(__name__)


def count(kind: str) -> None:
    """Counts one retry of `kind` (a key of counts())."""
    with _lock:
        _counts[kind] += 1


def _tensorstore_retries() -> int:
    """Returns TensorStore's count of retried Cloud Storage requests in this process."""
    total = 0
    for metric in ts.experimental_collect_matching_metrics(TENSORSTORE_METRIC):
        if metric.get("name") == TENSORSTORE_METRIC:
            total += sum(int(v.get("value", 0)) for v in metric.get("values", []))
    return total


class _ApiCoreRetries(logging.Handler):
    """Counts google.api_core's "Retrying due to ..." records."""

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Retrying due to"):
            count("google-cloud-storage")


def _watch_api_core() -> None:
    """Installs the counter of google.api_core's retries (once)."""
    logger = logging.getLogger(API_CORE_LOGGER)
    with _lock:
        if any(isinstance(h, _ApiCoreRetries) for h in logger.handlers):
            return
        logger.addHandler(_ApiCoreRetries())
    logger.setLevel(logging.DEBUG)  # it logs its retries at DEBUG only
    logger.propagate = False  # counted instead: DEBUG lines would reach absl's handler


def counts() -> dict[str, int]:
    """Returns {library: retried requests so far in this process} of what can be counted here."""
    _watch_api_core()
    with _lock:
        snapshot = dict(_counts)
    return {"tensorstore": _tensorstore_retries(), **snapshot}


class RetryCount:
    """The retries of one run: `since_last()` returns those counted since its previous call."""

    def __init__(self):
        self.start = counts()
        self.last = dict(self.start)

    def since_last(self) -> dict[str, int]:
        """Returns {library: retries} counted since the previous call (only the non-zero ones)."""
        now = counts()
        new = {k: now[k] - self.last.get(k, 0) for k in now if now[k] > self.last.get(k, 0)}
        self.last = now
        return new

    def log_new(self, step: int) -> int:
        """Logs the retries counted since the previous call (a bucket's bad day, the run goes on);
        returns the run's total so far."""
        new = self.since_last()
        if new:
            _LOG.warning("Storage requests retried by step %d: %s; going on.", step, describe(new))
        return sum(self.so_far().values())

    def log_total(self) -> None:
        """Logs the retries of the whole run, if any (counted up to now)."""
        self.since_last()
        if self.so_far():
            _LOG.warning("Storage requests retried in this run: %s.", describe(self.so_far()))

    def so_far(self) -> dict[str, int]:
        """Returns {library: retries} counted since the run started, up to the last since_last()."""
        return {k: v - self.start.get(k, 0) for k, v in self.last.items() if v > self.start.get(k, 0)}


def describe(retried: dict[str, int]) -> str:
    """Returns "3 (tensorstore 2, data reads 1)" of {library: retries}."""
    return f"{sum(retried.values())} ({', '.join(f'{k} {v}' for k, v in retried.items())})"
