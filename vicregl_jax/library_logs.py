"""The libraries' logs around an expected failure, at their source: Orbax leaves one unawaited
task per array when one read or write fails (a damaged checkpoint, a full disk), and asyncio
logs each with its traceback (thousands of lines); Orbax logs its failed save with a traceback
too. The failure itself is raised to the Checkpointer, which skips the checkpoint with one line
or stops with one `error:` line. Shown anyway with VICREGL_LIBRARY_TRACEBACKS set (main.py sets it
for --verbosity=1)."""

from __future__ import annotations

import logging
import os

# Set (to anything), the libraries' own reports of the failures around a damaged checkpoint or
# a full disk are shown too (main.py sets it for --verbosity=1).
LIBRARY_TRACEBACKS_ENV = "VICREGL_LIBRARY_TRACEBACKS"


class _QuietAsyncio(logging.Filter):
    """Drops asyncio's reports of the tasks Orbax leaves unawaited once one of them failed (one
    traceback per array: thousands for a damaged checkpoint or a full disk) and of callbacks on
    its closed event loops. The first failure is raised to the Checkpointer, which names it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get(LIBRARY_TRACEBACKS_ENV):
            return True
        message = record.getMessage()
        if message.startswith(("Task exception was never retrieved", "Future exception was never retrieved")):
            return False
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed")


class _OrbaxWithoutTraceback(logging.Filter):
    """Keeps Orbax's error lines but not their tracebacks (its failed save or restore is raised
    to the Checkpointer too, and reported once, by us)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "orbax" in record.pathname and not os.environ.get(LIBRARY_TRACEBACKS_ENV):
            record.exc_info, record.exc_text = None, None
        return True


_FILTERS = {"asyncio": _QuietAsyncio(), "absl": _OrbaxWithoutTraceback()}


def install() -> None:
    """Adds the filters to the asyncio and absl loggers (once)."""
    for name, quiet in _FILTERS.items():
        if quiet not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(quiet)
