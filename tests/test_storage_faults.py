"""A bucket on a bad day, and the demo on a bucket: the Storage emulator's proxy answers 429 /
503 or drops connections (vicregl_jax.storage_proxy), for every client (TensorFlow's gs://
file system, TensorStore, google-cloud-storage, ArrayRecord's reader). Reads retry and go on,
with the retries counted in the run's log; a save that fails part-way is one line and the
checkpoint before it resumes; the workdir lock holds; and `main.py --config=configs/demo.py
--workdir=gs://...`, killed with SIGKILL, resumes bit for bit and evaluates."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from launch_helpers import ROOT, TOTAL_STEPS, assert_bitwise_equal, reference_run, run_env, tiny_run_flags, wait_until
from orbax.checkpoint._src.path import gcs_utils
from storage_fixture import BUCKET

from vicregl_jax import storage_retries
from vicregl_jax import workdir as workdir_lib
from vicregl_jax.checkpoint import Checkpointer
from vicregl_jax.data import sources

KINDS = ("429", "503", "drop")


def _faults(emulator, client: str, **where):
    """Injects one fault of each kind for the client's next requests; returns the scenarios."""
    return [emulator.inject(kind, requests=1, client=client, **where) for kind in KINDS]


def test_every_client_retries_429_503_and_dropped_connections_and_the_retries_are_counted(
    storage_emulator, data_dir, tmp_path
):
    root = f"gs://{BUCKET}/bad_day"
    payload = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    # TensorFlow's file system: a write and reads, each through one fault.
    for fault in _faults(storage_emulator, "tensorflow"):
        with tf.io.gfile.GFile(f"{root}/blob.bin", "wb") as f:
            f.write(payload)
        with tf.io.gfile.GFile(f"{root}/blob.bin", "rb") as f:
            assert f.read() == payload
        assert fault.injected == 1

    # Orbax: the arrays through TensorStore, the steps listed by google-cloud-storage.
    before = storage_retries.counts()
    tree = {"w": jnp.arange(3000, dtype=jnp.float32).reshape(30, 100), "b": jnp.ones(7, jnp.int32)}
    writer = Checkpointer(f"{root}/run", {}, items=("model",))
    writer.save_items(1, {"model": tree})
    writer.close()
    # Orbax asks google-cloud-storage for the bucket once per process (an lru_cache): forget it,
    # or a test of the same process that restored from the bucket earlier leaves nothing to fault.
    gcs_utils.get_bucket.cache_clear()
    faults = _faults(storage_emulator, "tensorstore") + _faults(storage_emulator, "google-cloud-storage")
    reader = Checkpointer(f"{root}/run", {}, items=("model",), read_only=True)
    step, restored, skipped, _ = reader.restore_items({"model": jax_like(tree)})
    reader.close()
    assert step == 1 and not skipped
    assert {k: np.asarray(v).tobytes() for k, v in restored["model"].items()} == {
        k: np.asarray(v).tobytes() for k, v in tree.items()
    }
    assert [f.injected for f in faults] == [1] * 6
    after = storage_retries.counts()
    # TensorStore's own count: its 429 and 503 retries (a dropped connection it sends again may not count).
    assert after["tensorstore"] - before["tensorstore"] >= 2
    assert after["google-cloud-storage"] - before["google-cloud-storage"] >= 3  # google.api_core's retries

    # ArrayRecord's reader: the embedded photos' shards copied to the bucket, read back equal.
    local = sources.tfds_source("vicregl_photos", "train", data_dir=data_dir)
    folder = os.path.join(data_dir, "vicregl_photos")
    for path in tf.io.gfile.glob(f"{folder}/*/*"):
        target = f"{root}/tfds/vicregl_photos/{os.path.relpath(path, folder)}"
        tf.io.gfile.makedirs(os.path.dirname(target))
        tf.io.gfile.copy(path, target, overwrite=True)
    remote = sources.tfds_source("vicregl_photos", "train", data_dir=f"{root}/tfds")
    indices = list(range(0, local.num_examples, 5))
    faults = _faults(storage_emulator, "arrayrecord")
    records, _, errors = remote.read_records(indices)
    assert errors == [None] * len(indices) and [f.injected for f in faults] == [1, 1, 1]
    assert records == local.read_records(indices)[0]


def jax_like(tree):
    """Returns ShapeDtypeStructs of a tree of arrays, on their shardings."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_the_workdir_lock_holds_against_a_second_run_through_faults(storage_emulator, monkeypatch):
    monkeypatch.setattr(workdir_lib, "REMOTE_SETTLE_S", 0.2)
    workdir = f"gs://{BUCKET}/bad_day_lock"
    # One fault of each kind, on the lock's write and read-back, then on the second run's look.
    faults = [storage_emulator.inject(k, requests=1, client="tensorflow", match="bad_day_lock/") for k in KINDS[:2]]
    first = workdir_lib.WorkdirLock(workdir, holder_only=True).acquire()
    try:
        faults.append(storage_emulator.inject("drop", requests=1, client="tensorflow", match="bad_day_lock/"))
        refusal = rf"in use by another run \(host .*, pid {os.getpid()}"
        with pytest.raises(workdir_lib.WorkdirLockedError, match=refusal):
            workdir_lib.WorkdirLock(workdir, holder_only=True).acquire()
        assert json.loads(tf.io.gfile.GFile(f"{workdir}/{workdir_lib.LOCK_NAME}").read())["token"] == first.token
    finally:
        first.release()
    assert [f.injected for f in faults] == [1] * 3
    assert storage_emulator.object_metadata(BUCKET, f"bad_day_lock/{workdir_lib.LOCK_NAME}") is None


SAVE = """
import sys
import jax.numpy as jnp
from vicregl_jax.checkpoint import Checkpointer, CheckpointError
checkpointer = Checkpointer(sys.argv[1], {}, items=("model",))
checkpointer.save_items(int(sys.argv[2]), {"model": {"w": jnp.full((40, 50), float(sys.argv[2]))}})
try:
    checkpointer.close()
except CheckpointError as error:
    sys.exit(f"error: {error}")
"""


def test_a_save_that_fails_part_way_is_one_line_and_the_previous_checkpoint_resumes(storage_emulator):
    """TensorFlow's retries shortened in that process (GCS_RETRY_CONFIG_*: its defaults take
    minutes to give up); the arrays are written, then the commit's requests all fail."""
    workdir = f"gs://{BUCKET}/bad_day_save"
    env = dict(run_env(1), GCS_RETRY_CONFIG_MAX_RETRIES="2", GCS_RETRY_CONFIG_INIT_DELAY_TIME_US="100000")

    first = Checkpointer(workdir, {}, items=("model",))
    first.save_items(1, {"model": {"w": jnp.full((40, 50), 1.0)}})
    first.close()
    fault = storage_emulator.inject("503", requests=1000, client="tensorflow", match="checkpoints/2/commit_success")
    failed = subprocess.run([sys.executable, "-c", SAVE, workdir, "2"], env=env, capture_output=True, text=True)
    storage_emulator.clear_faults()
    assert fault.injected >= 3 and failed.returncode == 1, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: Saving step 2 to {workdir}/checkpoints failed (AbortedError: All 2 retry"), last
    assert last.endswith("; step 1, the previous checkpoint, is intact: run the same command again to resume."), last
    assert storage_emulator.list_objects(BUCKET, "bad_day_save/checkpoints/2/")  # written part-way

    # The next run resumes from step 1 (step 2's unfinished folder is not a checkpoint).
    checkpointer = Checkpointer(workdir, {}, items=("model",))
    like = {"w": jax_like({"w": jnp.zeros((40, 50))})["w"]}
    step, restored, _, _ = checkpointer.restore_items({"model": like})
    checkpointer.close()
    assert step == 1 and float(restored["model"]["w"][0, 0]) == 1.0


def _demo_command(workdir: str, data_dir: str) -> list[str]:
    """Returns main.py's demo on workdir, shortened: the launch tests' tiny run, small evaluations."""
    return [
        sys.executable,
        "main.py",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        *tiny_run_flags(data_dir),
        "--config.mode=demo",
        "--config.eval.linear.epochs=2",
        "--config.eval.correspond.pairs=8",
    ]


def test_the_demo_on_a_bucket_killed_resumes_bitwise_and_evaluates_through_faults(
    storage_emulator, data_dir, tmp_path_factory
):
    reference = reference_run(tmp_path_factory.getbasetemp(), data_dir)  # shared with the launch tests
    workdir = f"gs://{BUCKET}/demo"
    env = dict(run_env(2), TF_CPP_MIN_LOG_LEVEL="0")  # TensorFlow's retry lines are INFO
    log = tmp_path_factory.mktemp("demo") / "killed.log"
    storage_emulator.slow_uploads(0.3)  # the steps after 2 come after the kill
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(_demo_command(workdir, data_dir), cwd=ROOT, env=env, stdout=out, stderr=out)
            try:
                wait_until(
                    lambda: (
                        proc.poll() is not None
                        or storage_emulator.object_metadata(BUCKET, "demo/checkpoints/2/commit_success.txt")
                    ),
                    "the checkpoint of step 2 is on the bucket",
                    timeout=300,
                )
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
    finally:
        storage_emulator.slow_uploads(0)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert not storage_emulator.list_objects(BUCKET, "demo/checkpoints/4/")

    # Resumed through a bad day: every client meets a 429, a 503 and a dropped connection.
    faults = [
        f for client in ("tensorflow", "tensorstore", "google-cloud-storage") for f in _faults(storage_emulator, client)
    ]
    resumed = subprocess.run(
        _demo_command(workdir, data_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    storage_emulator.clear_faults()
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert [f.injected for f in faults] == [1] * len(faults)
    assert f"Resuming from {workdir}/checkpoints at step 2 of {TOTAL_STEPS}." in resumed.stdout, resumed.stdout[:1500]
    assert "The operation failed and will be automatically retried" in resumed.stderr  # TensorFlow's own lines
    assert "Storage requests retried in this run: " in resumed.stderr and "tensorstore" in resumed.stderr
    assert_bitwise_equal(workdir, reference)
    summary = json.loads(tf.io.gfile.GFile(f"{workdir}/summary.json").read())
    assert set(summary["results"]) == {"trained", "random"}
    assert storage_emulator.list_objects(BUCKET, "demo/export/") and storage_emulator.object_metadata(
        BUCKET, "demo/pca.png"
    )
