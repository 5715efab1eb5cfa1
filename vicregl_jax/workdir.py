"""The workdir as a place on disk: its path, its config.json, checked before anything is
written there, and held by one pre-training run at a time.

    absolute(path)                   the path Orbax and JAX need (gs:// and other URLs unchanged)
    save_config / load_config        the run's nested config as config.json (and config.<step>.json
                                     when a run is resumed under another config)
    check_workdir(path)              raises ValueError when path is a file or not writable
    with WorkdirLock(path): ...      raises WorkdirLockedError while another run holds path

The lock is the file `run.lock` in the workdir: JSON with the holder's host, boot id, pid
(and the process's start time, so that a reused pid is not taken for the holder), start time
and a heartbeat (a counter and a time the holder rewrites every HEARTBEAT_S seconds from a
daemon thread). A lock is stale, and is taken over with a warning, when its holder was on this
machine (same host name and boot id) and its process is gone; when the holder was on another
host, when its heartbeat is older than STALE_AFTER_S by this host's clock, or when its counter
does not move for STALE_AFTER_S seconds of watching (which avoids trusting another host's
clock: a live holder is recognised within one heartbeat, a killed one after STALE_AFTER_S).
On a local path the lock is created with O_EXCL, so two runs starting at once cannot both
take it. On gs:// and other URLs there is no exclusive create in the file API:
the lock is written, read back after a pause, and held only if it still carries this run's
token, which refuses every second run except one started within that pause of the first.
Only process 0 of a multi-process run takes the lock; it tells the others the outcome.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from vicregl_jax import config as config_lib
from vicregl_jax.safe_io import write_atomic

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
# A remote lock is read back this long after writing it: another run's write within this
# window is seen.
REMOTE_SETTLE_S = 2.0


# An empty --workdir (an unset $WORKDIR) would be the current directory: refused.
EMPTY_WORKDIR = (
    "--workdir is empty (an unset variable such as $WORKDIR?): give the run's folder, e.g. --workdir=runs/x; "
    "nothing was written."
)


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir."""


def is_remote(path) -> bool:
    """Returns whether path is a URL (gs://, s3://, ...) rather than a local path."""
    return "://" in str(path)


def absolute(path) -> epath.Path:
    """Returns path made absolute (Orbax and JAX's cache need one); gs:// and other URLs stay as
    they are. Raises ValueError for an empty path (which would be the current directory)."""
    text = str(path)
    if not text.strip():
        raise ValueError(EMPTY_WORKDIR)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def is_workdir(path) -> bool:
    """Returns whether path holds a config.json (a pre-training or converted workdir)."""
    return (absolute(path) / "config.json").exists()


def save_config(workdir, config) -> None:
    """Writes the run's config as JSON in the workdir (host 0 only)."""
    if jax.process_index() != 0:
        return
    path = absolute(workdir)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))


def config_history(workdir) -> list[tuple[int, epath.Path]]:
    """Returns (step, path) of the configs a workdir's run was resumed under (config.<step>.json),
    oldest first; config.json, the config it started with, is step 0."""
    root = absolute(workdir)
    found = [(0, root / "config.json")]
    if root.exists():
        for path in root.glob("config.*.json"):
            middle = path.name[len("config.") : -len(".json")]
            if middle.isdigit():
                found.append((int(middle), path))
    return sorted(found, key=lambda item: item[0])


def load_config(workdir, step: int | None = None) -> ml_collections.ConfigDict:
    """Returns the config a run saved in its workdir: the one it was last resumed under (at or
    before step, when given), else the one it started with (config.json)."""
    history = config_history(workdir)
    path = history[0][1]
    for at, candidate in history[1:]:
        if step is None or at <= step:
            path = candidate
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a vicregl_jax workdir "
            "(pre-train there first, or convert release weights with `convert from-torch`)."
        )
    saved = read_config_file(path)
    if "model" not in saved:
        raise ValueError(
            f"{path} is the config of an earlier version of vicregl_jax (flat keys, no 'model' "
            "section): its checkpoints do not load in this version; retrain, or export the weights "
            "to PyTorch with the earlier version and convert them back with `convert from-torch`."
        )
    config = config_lib.default_config()
    config.update_from_flattened_dict(_flatten(saved))
    return config


def read_config_file(path) -> dict:
    """Returns the JSON of a saved config; raises ValueError naming the file and the fix when it
    is damaged (a torn write, an edit gone wrong)."""
    try:
        saved = json.loads(epath.Path(path).read_text())
    except ValueError as error:  # also UnicodeDecodeError
        saved, why = None, f"{type(error).__name__}: {error}"
    else:
        why = None if isinstance(saved, dict) else f"a JSON {type(saved).__name__}, not an object"
    if why is not None:
        raise ValueError(
            f"{path} is damaged ({why}): it is the run's config, which resuming, evaluating and exporting "
            "read; put back a copy of it (the checkpoints are intact), or start again in another --workdir."
        )
    return saved


def save_resume_config(workdir, config, step: int) -> epath.Path:
    """Writes the config a run is resumed under at step as config.<step>.json (host 0);
    returns its path."""
    path = absolute(workdir) / f"config.{step}.json"
    if jax.process_index() == 0:
        write_atomic(path, config.to_json_best_effort(indent=2, sort_keys=True))
    return path


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = tuple(map(_tuples, value)) if isinstance(value, list) else value
    return out


def _tuples(value):
    return tuple(map(_tuples, value)) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------
# Checked and locked
# --------------------------------------------------------------------------------------------


def check_workdir(path) -> None:
    """Raises ValueError when the workdir cannot be used: it (or the nearest existing folder
    above it) is a file, or is not writable; it is empty (an unset variable); it is a URL that
    cannot be read (no network, no credentials), named with its bucket. Creates nothing."""
    text = str(path)
    if not text.strip():
        raise ValueError(EMPTY_WORKDIR)
    if is_remote(text):
        _check_reachable(text)
        return
    probe = os.path.abspath(text)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(
            f"--workdir={text}: {probe} is a file, not a folder: give the path of a folder (it is created if missing)."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is" if probe == os.path.abspath(text) else f"would be created in {probe}, which is"
        raise ValueError(
            f"--workdir={text} {where} not writable (read-only or another user's): give a folder you can write to."
        )


def _probe(url: str) -> bool:
    return epath.Path(url).exists()


def _check_reachable(url: str) -> None:
    """Raises ValueError naming the bucket and what to check when a URL workdir cannot be read
    (no network, no credentials, no such bucket); reads only."""
    try:
        _probe(url)
    except Exception as error:  # noqa: BLE001 (the storage client's errors have no common type)
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        detail = " ".join(str(error).split())[:200]
        raise ValueError(
            f"--workdir={url}: cannot reach the bucket {bucket} ({type(error).__name__}: {detail}): check the "
            "bucket's name, your credentials (gcloud auth application-default login) and the network."
        ) from None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """Returns the start time of a process of this machine in clock ticks since boot ("" when
    unknown): with the pid, it names a process even after its pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _pid_alive(pid: int, start: str = "") -> bool:
    """Returns whether the process pid (started at `start`, when known) runs on this machine."""
    if pid <= 0:  # os.kill would address a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    now = _process_start(pid)
    return not (start and now and now != start)


def describe_holder(info: dict) -> str:
    """Returns "host H, pid P (started ...)" of a lock's contents."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')} (started {started})"


class WorkdirLock:
    """An exclusive hold on a workdir for one pre-training run (see the module docstring).

    `acquire()` raises WorkdirLockedError, naming the holder and what to do, when another
    live run holds the workdir; `release()` removes the lock. Also a context manager.
    """

    def __init__(self, workdir, *, holder_only: bool | None = None):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.remote = is_remote(workdir)
        # Only process 0 of a multi-process run holds the lock.
        self.holder = jax.process_index() == 0 if holder_only is None else holder_only
        self.token = uuid.uuid4().hex
        self.identity = {
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "token": self.token,
            "started": time.time(),
        }
        self.beat = 0
        self._stop = threading.Event()
        self._thread = None
        self.held = False

    # ---------------------------------------------------------------- the file

    def _contents(self) -> str:
        return json.dumps({**self.identity, "beat": self.beat, "heartbeat": time.time()})

    def _read(self) -> dict | None:
        """Returns the lock's contents, None when there is no lock (or {} when unreadable)."""
        for _ in range(10):
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except (ValueError, OSError):  # caught between its creation and its first write: read again
                time.sleep(0.1)
        return {}

    def _create(self) -> bool:
        """Writes the lock if none exists; returns whether this run now holds it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(self._contents())
            return True
        if self.path.exists():
            return False
        self.path.write_text(self._contents())
        time.sleep(REMOTE_SETTLE_S)
        return (self._read() or {}).get("token") == self.token

    def _rewrite(self) -> None:
        if self.remote:
            self.path.write_text(self._contents())
            return
        tmp = f"{os.fspath(self.path)}.{self.token}.tmp"
        with open(tmp, "w") as f:
            f.write(self._contents())
        os.replace(tmp, os.fspath(self.path))

    def _remove_stale(self, info: dict) -> None:
        """Moves a stale lock out of the way, unless another run replaced it meanwhile."""
        if self.remote:
            if (self._read() or {}).get("token") == info.get("token"):
                self.path.unlink(missing_ok=True)
            return
        aside = f"{os.fspath(self.path)}.stale.{self.token}"
        try:
            os.replace(os.fspath(self.path), aside)
        except FileNotFoundError:
            return
        try:
            with open(aside) as f:
                moved = json.loads(f.read())
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") not in (None, info.get("token")):
            # Another run took the lock over between our read and the move: give it back.
            os.replace(aside, os.fspath(self.path))
        else:
            os.remove(aside)

    # ---------------------------------------------------------------- staleness

    def _why_stale(self, info: dict) -> str | None:
        """Returns why the holder of info is gone, or None when it is alive (may watch its
        heartbeat for up to STALE_AFTER_S when it ran on another host)."""
        if not info:
            return "its lock file is unreadable"
        same_machine = info.get("host") == self.identity["host"] and info.get("boot_id") == self.identity["boot_id"]
        if same_machine:  # the process table answers (a stopped, ^Z'd holder is alive too)
            if _pid_alive(int(info.get("pid", -1)), str(info.get("pid_start", ""))):
                return None
            return f"pid {info.get('pid')} is no longer running on this host"
        age = time.time() - float(info.get("heartbeat", 0))
        if age > STALE_AFTER_S:
            return f"its heartbeat stopped {age:.0f} s ago"
        # Another host: watch the heartbeat counter rather than trusting its clock.
        deadline = time.monotonic() + STALE_AFTER_S
        while time.monotonic() < deadline:
            time.sleep(min(1.0, HEARTBEAT_S / 4))
            now = self._read()
            if now is None:
                return "it released the lock"
            if now.get("token") != info.get("token") or now.get("beat") != info.get("beat"):
                return None
        return f"its heartbeat did not move for {STALE_AFTER_S:.0f} s"

    # ---------------------------------------------------------------- holding

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.beat += 1
            try:
                self._rewrite()
            except OSError as error:  # a full disk must not stop training; a later beat retries
                logging.warning("Could not refresh %s: %s", self.path, error)

    def _try_acquire(self) -> str | None:
        """Takes the lock (over a stale one); returns None, or the refusal message."""
        for _ in range(5):
            if self._create():
                return None
            info = self._read()
            if info is None:
                continue  # released meanwhile
            reason = self._why_stale(info)
            if reason is None:
                return (
                    f"{self.workdir} is in use by another run ({describe_holder(info)}): wait for it to "
                    f"finish or stop it, or use another --workdir. If no run is using it, delete {self.path}."
                )
            logging.warning("Taking over the lock of %s from %s: %s.", self.workdir, describe_holder(info), reason)
            self._remove_stale(info)
        return f"{self.workdir}: could not take the lock {self.path} (other runs keep taking it); try again."

    def acquire(self) -> WorkdirLock:
        """Takes the lock (process 0) and starts its heartbeat; raises WorkdirLockedError."""
        refusal = self._try_acquire() if self.holder else None
        if jax.process_count() > 1:
            refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
            if int(refused) and refusal is None:
                refusal = f"{self.workdir}: process 0 could not lock the workdir (see its error)."
        if refusal is not None:
            raise WorkdirLockedError(refusal)
        if self.holder:
            self.held = True
            self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
            self._thread.start()
        return self

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if this run still holds it."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self._read() or {}).get("token") == self.token:
                self.path.unlink(missing_ok=True)
        except OSError as error:
            logging.warning("Could not remove %s: %s", self.path, error)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
