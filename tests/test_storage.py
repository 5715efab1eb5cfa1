"""Every gs:// path of the product against the Storage emulator (vicregl_jax.storage_emulator),
through the production code: tf.io.gfile and etils epath, folder datasets and their manifests,
a training run on a gs:// workdir (Orbax checkpoints through TensorStore, config.json,
metrics.jsonl, TensorBoard summaries, the workdir lock), restoring from it, and JAX's
compilation cache. TFDS preparation and ArrayRecord reads on a bucket: tests/test_prepare.py.
Not here: worker logs, which launch/tpu_worker.sh copies with the gcloud CLI (not installed
here; faked in tests/test_launch.py)."""

import io
import json
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import chex
import jax
import numpy as np
import pytest
import tensorflow as tf
from etils import epath
from flax import nnx
from PIL import Image
from storage_fixture import BUCKET
from tiny import tiny_config

from vicregl_jax import release, train
from vicregl_jax import workdir as workdir_lib
from vicregl_jax.data import folder, manifest, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def download(emulator, name: str) -> bytes:
    """Returns an object's bytes read from the emulator's HTTP API directly (not through TensorFlow)."""
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media", timeout=10) as r:
        return r.read()


def test_tf_gfile_and_epath_read_write_list_rename_and_glob_on_the_emulator(storage_emulator):
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()  # several upload chunks
    before = storage_emulator.traffic("tensorflow").requests
    tf.io.gfile.makedirs(f"gs://{BUCKET}/gfile/a")
    with tf.io.gfile.GFile(f"gs://{BUCKET}/gfile/a/blob.bin", "wb") as f:
        f.write(payload)
    assert download(storage_emulator, "gfile/a/blob.bin") == payload  # what the bucket holds
    assert storage_emulator.traffic("tensorflow").requests > before  # TensorFlow went through the proxy
    assert tf.io.gfile.stat(f"gs://{BUCKET}/gfile/a/blob.bin").length == len(payload)
    with tf.io.gfile.GFile(f"gs://{BUCKET}/gfile/a/blob.bin", "rb") as f:
        f.seek(1_234_567)
        assert f.read(1000) == payload[1_234_567:1_235_567]
    tf.io.gfile.rename(f"gs://{BUCKET}/gfile/a/blob.bin", f"gs://{BUCKET}/gfile/a/moved.bin")
    assert tf.io.gfile.listdir(f"gs://{BUCKET}/gfile/a") == ["moved.bin"]
    assert tf.io.gfile.glob(f"gs://{BUCKET}/gfile/*/*.bin") == [f"gs://{BUCKET}/gfile/a/moved.bin"]
    assert storage_emulator.object_metadata(BUCKET, "gfile/a/blob.bin") is None

    path = epath.Path(f"gs://{BUCKET}/epath/x/config.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"a": 1}')
    assert json.loads(download(storage_emulator, "epath/x/config.json")) == {"a": 1}
    assert json.loads(path.read_text()) == {"a": 1} and path.exists() and path.parent.is_dir()
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_the_proxy_refuses_every_host_but_the_storage_ones(storage_emulator):
    with socket.create_connection(("127.0.0.1", storage_emulator.proxy_port), timeout=10) as s:
        s.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 403")


def _jpeg(rng) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def test_a_folder_dataset_and_its_manifest_on_a_bucket(storage_emulator):
    rng = np.random.default_rng(1)
    root = f"gs://{BUCKET}/folder/train"
    images = {}
    for label, name in enumerate(["cat", "dog"]):
        for i in range(3):
            path = f"{root}/{name}/{i}.jpg"
            images[path] = (_jpeg(rng), label)
            with tf.io.gfile.GFile(path, "wb") as f:
                f.write(images[path][0])

    def read_all():
        source = sources.folder_source(f"gs://{BUCKET}/folder", "train")
        records, labels, errors = source.read_records(list(range(source.num_examples)))
        assert errors == [None] * source.num_examples
        return {source.describe(i): (records[i], labels[i]) for i in range(source.num_examples)}

    assert read_all() == images  # listed by a walk
    assert manifest.main([root]) == 0
    assert folder.read_manifest(root) is not None
    assert storage_emulator.object_metadata(BUCKET, f"folder/train/{folder.MANIFEST_NAME}") is not None
    assert read_all() == images  # listed by the manifest


def test_the_workdir_lock_holds_a_gs_workdir_against_a_second_run(storage_emulator, monkeypatch):
    monkeypatch.setattr(workdir_lib, "REMOTE_SETTLE_S", 0.2)
    workdir = f"gs://{BUCKET}/locked"
    first = workdir_lib.WorkdirLock(workdir, holder_only=True).acquire()
    try:
        held = json.loads(download(storage_emulator, f"locked/{workdir_lib.LOCK_NAME}"))
        assert held["pid"] == os.getpid() and held["token"] == first.token
        refusal = rf"in use by another run \(host .*, pid {os.getpid()}"
        with pytest.raises(workdir_lib.WorkdirLockedError, match=refusal):
            workdir_lib.WorkdirLock(workdir, holder_only=True).acquire()
    finally:
        first.release()
    assert storage_emulator.object_metadata(BUCKET, f"locked/{workdir_lib.LOCK_NAME}") is None


def test_a_training_run_on_a_gs_workdir_checkpoints_logs_and_resumes_there(
    storage_emulator, data_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(workdir_lib, "REMOTE_SETTLE_S", 0.2)
    config = tiny_config(data_dir)
    workdir = f"gs://{BUCKET}/run"
    train.train_and_evaluate(config, workdir, stop_after_steps=2)
    train.train_and_evaluate(config, tmp_path / "local", stop_after_steps=2)  # the same run, on a local disk
    names = set(storage_emulator.list_objects(BUCKET, "run/"))
    assert "run/config.json" in names and f"run/{workdir_lib.LOCK_NAME}" not in names  # released
    assert json.loads(download(storage_emulator, "run/config.json"))["total_steps"] == config.total_steps
    assert any(n.startswith("run/checkpoints/2/") for n in names)

    # Restored (checksums verified) from the bucket: the very arrays of the local run.
    model, _, step = release.load_workdir_model(workdir)
    local, _, _ = release.load_workdir_model(tmp_path / "local")
    assert step == 2
    weights = (nnx.Param, nnx.BatchStat)
    chex.assert_trees_all_equal(jax.device_get(nnx.state(model, weights)), jax.device_get(nnx.state(local, weights)))

    # Resumed from the bucket; metrics.jsonl and the TensorBoard events hold one row per step.
    result = train.train_and_evaluate(config, workdir, stop_after_steps=1)
    assert result.step == 3
    rows = [json.loads(line) for line in download(storage_emulator, "run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    events = [n for n in names if "events.out.tfevents" in n] + [
        n for n in storage_emulator.list_objects(BUCKET, "run/") if "events.out.tfevents" in n
    ]
    losses = {}
    for name in sorted(set(events)):
        for event in tf.compat.v1.train.summary_iterator(f"gs://{BUCKET}/{name}"):
            for value in event.summary.value:
                if value.tag == "loss":
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
    assert losses == pytest.approx({r["step"]: r["loss"] for r in rows}, rel=1e-6)


COMPILE = """
import sys
import jax
import jax.numpy as jnp
from vicregl_jax import distributed
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
distributed.enable_compilation_cache(None, sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
hits = []
for _ in range(2):  # the second compilation, its in-memory caches cleared, reads the bucket's entry
    jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(4.0)).block_until_ready()
    hits.append(sum(e == "/jax/compilation_cache/cache_hits" for e in events))
    jax.clear_caches()
print(*hits)
"""


def test_jax_compilation_cache_in_a_gs_workdir(storage_emulator):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(PYTHONPATH=ROOT, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-c", COMPILE, f"gs://{BUCKET}/cached_run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert storage_emulator.list_objects(BUCKET, "cached_run/compilation_cache/")  # written to the bucket
    first, second = map(int, run.stdout.split()[-2:])
    assert first == 0 and second > first, run.stdout  # and read back from it
