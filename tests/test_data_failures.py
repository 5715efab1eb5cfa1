"""Failures of the input pipeline: bad files, read errors, give-up rule, clean exits, prefetch, service."""

import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from helpers import free_port
from PIL import Image
from tiny import tiny_config

from vicregl_jax import build
from vicregl_jax.data import (
    CropGroup,
    EvalImages,
    PipelineError,
    ReadOptions,
    make_eval_iterator,
    make_pretrain_iterator,
    prefetch_to_mesh,
    sources,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(groups=(CropGroup(16, 2, (0.3, 1.0)),), stride=16, seed=0)
HOSTS = dict(process_index=0, process_count=1)


def _image(path, value):
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(path)


@pytest.fixture(scope="module")
def bad_class_folder(tmp_path_factory):
    """70 images in 7 class folders; class_3 holds 10 files that are not images."""
    root = tmp_path_factory.mktemp("bad_class")
    for c in range(7):
        (root / f"class_{c}").mkdir()
        for k in range(10):
            path = root / f"class_{c}" / f"{k}.png"
            if c == 3:
                path.write_bytes(b"not an image at all")
            else:
                _image(path, 10 * c + k)
    return root


def test_a_bad_class_folder_does_not_stop_training_and_is_reported(bad_class_folder):
    it = make_pretrain_iterator(
        f"folder:{bad_class_folder}", "train", global_batch_size=16, read=ReadOptions(**HOSTS), **SMALL
    )
    for _ in range(5):  # 80 images: more than an epoch, every bad file met
        batch = next(it)
        assert (batch["label"] != 3).all()  # substitutes are good images of other classes
    assert it.num_undecodable >= 10 and it.num_unreadable == 0
    assert it.failed_examples and all(
        "class_3" in name and name.endswith("(undecodable)") for name in it.failed_examples
    )
    it.close()


def test_the_give_up_rule_is_the_share_of_failures_in_a_window(bad_class_folder):
    # 1 in 7 files fails: far above 2 % of a window of 50 images.
    it = make_pretrain_iterator(
        f"folder:{bad_class_folder}",
        "train",
        global_batch_size=16,
        read=ReadOptions(**HOSTS, failure_window=50, max_failure_share=0.02),
        **SMALL,
    )
    with pytest.raises(PipelineError, match=r"of the last \d+ images.*max_failure_share=0.02.*class_3"):
        for _ in range(10):
            next(it)


def test_read_errors_are_retried_then_counted_apart_and_named(tmp_path, monkeypatch):
    for k in range(8):
        _image(tmp_path / f"{k}.png", k)
    calls = {}
    real = sources.read_file

    def flaky(path):  # every file times out once; 3.png has vanished since the listing
        calls[path] = calls.get(path, 0) + 1
        if path.endswith("3.png"):
            raise FileNotFoundError(path)
        if calls[path] == 1:
            raise TimeoutError("storage throttled")
        return real(path)

    monkeypatch.setattr(sources, "read_file", flaky)
    monkeypatch.setattr(sources, "READ_BACKOFF_S", 0.001)
    it = make_pretrain_iterator(f"folder:{tmp_path}", "train", global_batch_size=8, read=ReadOptions(**HOSTS), **SMALL)
    next(it)
    assert it.num_unreadable >= 1 and it.num_undecodable == 0
    assert any(name.endswith("3.png (unreadable)") for name in it.failed_examples)
    assert calls[str(tmp_path / "3.png")] >= 1
    assert all(n >= 2 for path, n in calls.items() if not path.endswith("3.png"))  # retried
    it.close()


ALL_CORRUPT = """
import sys
from vicregl_jax.data import CropGroup, ReadOptions, make_pretrain_iterator
it = make_pretrain_iterator("folder:" + sys.argv[1], "train", groups=(CropGroup(16, 1, (0.5, 1.0)),),
                            stride=16, global_batch_size=8, seed=0,
                            read=ReadOptions(process_index=0, process_count=1))
next(it)
"""


def test_an_all_corrupt_dataset_ends_the_process_promptly_with_its_message(tmp_path):
    """The error used to be printed and the process then hung at exit in tf.data's iterator
    destructor (3 runs in 4): three processes at once, each must exit within the timeout."""
    for k in range(12):
        (tmp_path / f"{k}.jpg").write_bytes(b"\xff\xd8\xff broken")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ALL_CORRUPT, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for p in procs:
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the process hung after the pipeline's error")
        assert p.returncode != 0 and "PipelineError" in err and "failed to decode" in err, err[-2000:]


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "vicregl_mesh_prefetch"]


def test_prefetch_puts_batches_on_the_mesh_and_stops_cleanly(bad_class_folder, tmp_path, data_dir):
    mesh = jax.make_mesh((8,), ("data",))
    # At the end of a finite iterator.
    evaluation = make_eval_iterator(
        "vicregl_digits",
        "test",
        global_batch_size=64,
        images=EvalImages(image_size=16, resize_size=16),
        read=ReadOptions(**HOSTS, data_dir=data_dir),
    )
    with prefetch_to_mesh(evaluation, mesh) as batches:
        got = list(batches)
        assert len(got) == 5 and got[0]["image"].sharding.spec[0] == "data"
        assert batches.stats()["step"] == 5
    assert not _prefetch_threads()
    # Early close of an endless one: the thread stops.
    endless = make_pretrain_iterator(
        f"folder:{bad_class_folder}", "train", global_batch_size=16, read=ReadOptions(**HOSTS), **SMALL
    )
    batches = prefetch_to_mesh(endless, mesh, size=2)
    first = next(batches)
    assert first["views"][0].dtype == np.uint8 and batches.step == 1  # as of the batch delivered
    batches.close()
    assert not _prefetch_threads()
    # On error: raised by next(), then nothing left running.
    for k in range(8):
        (tmp_path / f"{k}.jpg").write_bytes(b"broken")
    broken = make_pretrain_iterator(
        f"folder:{tmp_path}", "train", global_batch_size=8, read=ReadOptions(**HOSTS), **SMALL
    )
    batches = prefetch_to_mesh(broken, mesh)
    with pytest.raises(PipelineError, match="failed to decode"):
        next(batches)
    deadline = time.time() + 10
    while _prefetch_threads() and time.time() < deadline:
        time.sleep(0.05)
    assert not _prefetch_threads()
    with pytest.raises(StopIteration):
        next(batches)


def test_tf_data_service_with_two_workers_gives_the_local_batches_and_resumes(bad_class_folder, tmp_path):
    for k in range(24):
        _image(tmp_path / f"{k}.png", 10 * k)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "vicregl_jax.data.service"]
    procs = [subprocess.Popen(command + ["dispatcher", f"--port={port}"], env=env)]
    procs += [
        subprocess.Popen(
            command + ["worker", f"--dispatcher=localhost:{port}", "--worker_address=localhost:%port%"], env=env
        )
        for _ in range(2)
    ]
    try:
        # The run's own path: config.data.service reaches the iterator build.pretrain_iterator opens.
        settings = {
            "data.dataset": f"folder:{tmp_path}",
            "batch_size": 8,
            "data.num_threads": 2,
            "data.resize": "tensorflow",
        }
        config = tiny_config(None, settings)
        served_config = tiny_config(None, {**settings, "data.service": f"grpc://localhost:{port}"})
        local = build.pretrain_iterator(config, 0)
        served = build.pretrain_iterator(served_config, 0)
        want = [next(local) for _ in range(6)]
        for step in range(4):
            got = next(served)
            for u, v in zip(got["views"] + got["grids"], want[step]["views"] + want[step]["grids"]):
                np.testing.assert_array_equal(u, v)
        resumed = build.pretrain_iterator(served_config, 4)
        kwargs = dict(global_batch_size=8, read=ReadOptions(**HOSTS), **SMALL)
        for step in (4, 5):
            got = next(resumed)
            np.testing.assert_array_equal(got["views"][0], want[step]["views"][0])
        for it in (local, served, resumed):
            it.close()
        with pytest.raises(ValueError, match="folder dataset"):
            make_pretrain_iterator("vicregl_photos", "train", service=f"grpc://localhost:{port}", **kwargs)
        with pytest.raises(ValueError, match="resize='pillow'.*resize='tensorflow'"):
            make_pretrain_iterator(
                f"folder:{tmp_path}",
                "train",
                service=f"grpc://localhost:{port}",
                **{**kwargs, "read": ReadOptions(**HOSTS, resize="pillow")},
            )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    """SLURM and containers bind a process to fewer CPUs than the machine has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7})
    monkeypatch.setattr(os, "cpu_count", lambda: 256)
    assert ReadOptions().threads() == 3
    assert ReadOptions(num_threads=2).threads() == 2
    with pytest.raises(ValueError, match="num_threads=0"):
        ReadOptions(num_threads=0)
