"""workdir.py: one run per workdir (the lock and its staleness rules), and a workdir that
cannot be written refused before anything is written."""

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from tiny import tiny_config

from vicregl_jax import safe_io, train
from vicregl_jax import workdir as workdir_lib


def write_lock(workdir, **fields):
    os.makedirs(workdir, exist_ok=True)
    info = {
        "host": socket.gethostname(),
        "boot_id": workdir_lib._boot_id(),
        "pid": os.getpid(),
        "token": "other",
        "started": time.time(),
        "beat": 0,
        "heartbeat": time.time(),
        **fields,
    }
    (workdir / workdir_lib.LOCK_NAME).write_text(json.dumps(info))
    return info


def test_workdir_lock(data_dir, tmp_path, monkeypatch, caplog):
    # A live run on this host holds it: refused at once, naming the holder.
    write_lock(tmp_path / "live")
    with pytest.raises(
        workdir_lib.WorkdirLockedError,
        match=rf"live is in use by another run \(host "
        rf"{socket.gethostname()}, pid {os.getpid()} .*delete .*run.lock",
    ):
        train.train_and_evaluate(tiny_config(data_dir), tmp_path / "live")
    assert not (tmp_path / "live" / "config.json").exists()
    # Its pid is gone: stale, taken over with a warning, removed on release.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "dead", pid=dead.pid)
    with workdir_lib.WorkdirLock(tmp_path / "dead") as lock:
        assert json.loads((tmp_path / "dead" / "run.lock").read_text())["token"] == lock.token
    assert f"pid {dead.pid} is no longer running on this host" in caplog.text
    assert not (tmp_path / "dead" / "run.lock").exists()
    # Another host: an old heartbeat is stale; a fresh one is watched: a moving counter is a
    # live run (refused), a still one is taken over after STALE_AFTER_S.
    monkeypatch.setattr(workdir_lib, "STALE_AFTER_S", 1.0)
    write_lock(tmp_path / "old", host="elsewhere", heartbeat=time.time() - 3600)
    workdir_lib.WorkdirLock(tmp_path / "old").acquire().release()
    assert "its heartbeat stopped 3600 s ago" in caplog.text
    info = write_lock(tmp_path / "beating", host="elsewhere")
    stop = threading.Event()

    def beat():
        while not stop.wait(0.05):
            info["beat"] += 1
            write_lock(tmp_path / "beating", **info)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(workdir_lib.WorkdirLockedError, match="host elsewhere"):
            workdir_lib.WorkdirLock(tmp_path / "beating").acquire()
    finally:
        stop.set()
        thread.join()
    write_lock(tmp_path / "still", host="elsewhere")
    workdir_lib.WorkdirLock(tmp_path / "still").acquire().release()
    assert "its heartbeat did not move for 1 s" in caplog.text
    # Without an exclusive create (gs://): write, read back, hold only if the token is ours.
    monkeypatch.setattr(workdir_lib, "REMOTE_SETTLE_S", 0.01)
    first, second = workdir_lib.WorkdirLock(tmp_path / "remote"), workdir_lib.WorkdirLock(tmp_path / "remote")
    first.remote = second.remote = True
    first.acquire()
    with pytest.raises(workdir_lib.WorkdirLockedError):
        second.acquire()
    first.release()
    assert not (tmp_path / "remote" / "run.lock").exists()
    # Processes other than 0 do not take it.
    workdir_lib.WorkdirLock(tmp_path / "other", holder_only=False).acquire().release()
    assert not (tmp_path / "other" / "run.lock").exists()


def test_workdir_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file is a file, not a folder"):
        workdir_lib.check_workdir(tmp_path / "file" / "run")
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real(path, mode))
    with pytest.raises(ValueError, match=r"run would be created in .*, which is not writable"):
        workdir_lib.check_workdir(tmp_path / "run")
    assert sorted(os.listdir(tmp_path)) == ["file"]


# ------------------------------------------------------------------------------------------
# An empty --workdir, a damaged config.json, a full disk
# ------------------------------------------------------------------------------------------


def test_an_empty_workdir_is_refused_and_nothing_is_written(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (
        lambda: workdir_lib.check_workdir(""),
        lambda: workdir_lib.absolute(" "),
        lambda: train.train_and_evaluate(tiny_config(data_dir), ""),
    ):
        with pytest.raises(ValueError, match=r"^--workdir is empty \(an unset variable such as \$WORKDIR\?\)"):
            call()
    assert os.listdir(tmp_path) == []


def test_a_damaged_config_json_is_named_with_the_fix(tmp_path):
    for text in ('{"model": {"arch": "resn', "[1, 2]", "\udcff"):
        (tmp_path / "config.json").write_text(text, errors="surrogateescape")
        with pytest.raises(ValueError, match=r"config.json is damaged \(.*\): .* put back a copy of it") as error:
            workdir_lib.load_config(tmp_path)
        assert "\n" not in str(error.value)


def test_a_full_disk_leaves_config_json_whole_and_says_so(data_dir, tmp_path, monkeypatch):
    workdir_lib.save_config(tmp_path, tiny_config(data_dir))
    before = (tmp_path / "config.json").read_text()
    real_fsync = os.fsync

    def full(fd):  # the disk fills while the new file is written: injected at the boundary
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(safe_io.DiskFullError, match=r"config.json: no space left on its disk: free space there"):
        workdir_lib.save_config(tmp_path, tiny_config(data_dir, {"batch_size": 8}))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (tmp_path / "config.json").read_text() == before and os.listdir(tmp_path) == ["config.json"]


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs (root only), unmounted after the test."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the injected ENOSPC test covers the error path")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk_keeps_config_json_whole(data_dir, full_disk):
    workdir_lib.save_config(full_disk, tiny_config(data_dir))
    before = (full_disk / "config.json").read_text()
    config = tiny_config(data_dir, {"data.dataset": "x" * (3 * 2**20)})  # 3 MiB: more than the disk
    with pytest.raises(safe_io.DiskFullError, match=rf"^{full_disk}/config.json: no space left on its disk"):
        workdir_lib.save_config(full_disk, config)
    assert (full_disk / "config.json").read_text() == before and os.listdir(full_disk) == ["config.json"]


def test_an_unreachable_bucket_is_named_in_one_line(monkeypatch):
    def unreachable(url):  # what TensorFlow's gs:// file system raises without a network (faked: no network here)
        raise RuntimeError(f"Error executing an HTTP request: libcurl code 6 (Could not resolve hostname)\n {url}")

    monkeypatch.setattr(workdir_lib, "_probe", unreachable)
    with pytest.raises(ValueError, match=r"^--workdir=gs://b1/run: cannot reach the bucket b1 \(RuntimeError: .*\): "):
        workdir_lib.check_workdir("gs://b1/run")
