"""Stopping a pre-training run on SIGTERM (a preemption notice, SLURM's time limit) or SIGINT
(Ctrl-C) at any moment, in a state that resumes.

During start-up (lock, restore, data, compile: until the first step returns) there is no new
state to save: the signal stops the run at once, leaving the workdir as it was. In the loop,
the step under way ends, a checkpoint is saved and the run stops. Either way the process exits
with REQUEUE_EXIT_CODE (75) after SIGTERM, which the launchers requeue on, and 130 after
SIGINT, without a traceback. A step cannot hang the stop: when the main thread does not come
back to Python within STOP_GRACE_S of the signal (a read blocked on its input, a long
compilation), the process exits with the same status without saving, and resumes from its
newest checkpoint. On several processes a preemption notice reaches every host through JAX's
preemption sync point instead (Orbax's CheckpointManager.reached_preemption).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import jax

from vicregl_jax.distributed import REQUEUE_EXIT_CODE

# How long a signal may wait for the main thread before the process exits without a save.
STOP_GRACE_S = 60.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_CODES = {signal.SIGTERM: REQUEUE_EXIT_CODE, signal.SIGINT: 128 + signal.SIGINT}


class StopRequested(BaseException):  # noqa: N818 (a request, as KeyboardInterrupt is)
    """A signal stopped the run during start-up, before it had a state to save. A BaseException,
    as KeyboardInterrupt is, so that no library's `except Exception` takes it for its own error."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} during start-up")
        self.signum = signum


def exit_code(signum: int | None) -> int:
    """Returns the exit status of a run stopped by signum (75 for SIGTERM, 130 for SIGINT)."""
    return EXIT_CODES.get(signum, REQUEUE_EXIT_CODE)


class StopWatcher:
    """Tells the training loop when to save and stop (see the module docstring).

    `raising` (start-up) makes a signal raise StopRequested in the main thread; the loop
    clears it once its first step has returned and polls `should_stop(step)` after each step.
    A watchdog thread hears every signal through signal.set_wakeup_fd, which the interpreter
    writes even while the main thread runs C++ code, and exits the process when the main thread
    has not finished (`finish()`) within grace_s.
    """

    def __init__(self, manager=None, *, grace_s: float | None = None):
        self._flag = threading.Event()
        self._done = threading.Event()
        self.manager = manager
        self.grace_s = STOP_GRACE_S if grace_s is None else grace_s
        self.signum: int | None = None
        self.raising = True
        self._previous: dict = {}
        self._wakeup = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._install()

    def _install(self) -> None:
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        reader.settimeout(0.5)
        self._wakeup = (reader, writer, signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False))
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        threading.Thread(target=self._watchdog, name="stop-watchdog", daemon=True).start()

    def _on_signal(self, signum, frame):
        first = not self._flag.is_set()
        self.signum = self.signum or signum
        self._flag.set()
        name = signal.Signals(signum).name
        if self.raising:
            logging.warning("%s received during start-up: stopping; the workdir is as it was.", name)
            raise StopRequested(signum)
        if first:
            logging.warning("%s received: saving a checkpoint at the next step, then stopping.", name)

    def _watchdog(self) -> None:
        reader = self._wakeup[0]
        while not self._done.is_set():
            try:
                data = reader.recv(64)
            except TimeoutError:
                continue
            except OSError:
                return
            heard = [s for s in data if s in SIGNALS]
            if not heard:
                continue
            if self._done.wait(self.grace_s):
                return
            name = signal.Signals(heard[0]).name
            # The main thread is stuck in a step (its input blocks) or in C++ code: the newest
            # checkpoint on disk is the resume point.
            logging.error(
                "%s received %.0f s ago and the run has not stopped (a step blocked on its input?): exiting "
                "without a save; it resumes from its newest checkpoint.",
                name,
                self.grace_s,
            )
            logging.shutdown()
            os._exit(exit_code(heard[0]))

    def should_stop(self, step: int) -> bool:
        """Returns True once a stop was asked for (checked at every step)."""
        if self._flag.is_set():
            return True
        if jax.process_count() > 1 and self.manager is not None:
            return bool(self.manager.reached_preemption(step))
        return False

    def finish(self) -> None:
        """Ends the watchdog's hold: the run is saving its last state or has stopped."""
        self._done.set()
        self.raising = False

    def close(self) -> None:
        """Puts back the signal handlers that were there before."""
        self.finish()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        if self._wakeup is not None:
            reader, writer, previous_fd = self._wakeup
            signal.set_wakeup_fd(previous_fd)
            reader.close()
            writer.close()
            self._wakeup = None
