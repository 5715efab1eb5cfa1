"""Data at pod scale: folder manifests (one read instead of a walk) and TFDS preparation by one
process of a multi-process run while the others wait (no file lock needed)."""

import collections
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf
from helpers import free_port, xla_flags

from vicregl_jax.data import folder, manifest, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """10,000 empty image files in 10 class folders (one with a nested sub-folder, one
    empty class), plus files that are not images."""
    root = tmp_path_factory.mktemp("big") / "images"
    for k in range(10):
        for i in range(1000):
            sub = root / f"class_{k}" / ("nested" if k == 3 and i % 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i:04d}.{'JPEG' if k == 5 else 'jpg'}").touch()
    (root / "class_00_empty").mkdir()
    (root / "class_1" / "notes.txt").touch()
    (root / "README.md").touch()
    return str(root)


def counting_gfile(monkeypatch):
    """Wraps tf.io.gfile's file-system calls (the layer `folder:` lists through, local or
    gs://) and returns the counter of their calls."""
    calls = collections.Counter()
    for name in ("listdir", "isdir", "walk", "exists", "glob", "stat", "GFile"):
        original = getattr(tf.io.gfile, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(tf.io.gfile, name, counted)
    return calls


def test_a_manifest_lists_ten_thousand_files_with_one_read_and_the_examples_of_the_walk(big_folder, monkeypatch):
    walked = folder.walk_image_folder(big_folder)
    assert len(walked[0]) == 10_000 and walked[2][:2] == ["class_0", "class_00_empty"]
    calls = counting_gfile(monkeypatch)
    walked_source = sources.folder_source(big_folder, "train")
    assert calls["listdir"] == 1 and calls["isdir"] > 10  # the walk: a request per entry (then os.walk locally)

    assert manifest.main([big_folder]) == 0
    assert os.path.exists(os.path.join(big_folder, folder.MANIFEST_NAME))
    calls.clear()
    source = sources.folder_source(big_folder, "train")
    # One read of the manifest; the two isdir calls resolve the split folder (train/ or the root).
    assert calls == {"GFile": 1, "isdir": 2}
    assert folder.list_image_folder(big_folder) == walked
    assert (
        (source.num_examples, source.num_classes)
        == (walked_source.num_examples, walked_source.num_classes)
        == (10_000, 11)
    )
    # The same examples: the same file and label at every index.
    assert [source.describe(i) for i in range(10_000)] == [walked_source.describe(i) for i in range(10_000)]
    everything = list(range(10_000))
    assert source.read_records(everything)[1] == walked_source.read_records(everything)[1]


def test_a_bucket_listing_gives_the_manifest_of_the_walk(tmp_path, capsys):
    """`gcloud storage ls -r` output (folder headers, blank lines) instead of a walk."""
    root = tmp_path / "data"
    for cls, names in {"dog": ["b.png", "a.jpg", "x/c.jpg", "notes.txt"], "cat": ["z.JPG"]}.items():
        for name in names:
            (root / cls / name).parent.mkdir(parents=True, exist_ok=True)
            (root / cls / name).touch()
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    listing = tmp_path / "listing.txt"
    listing.write_text("\n".join([f"{root}/cat/:", *files[:2], "", f"{root}/dog/:", *files[2:], "/elsewhere/y.jpg"]))
    walked = folder.walk_image_folder(str(root))
    assert manifest.main([str(root), f"--listing={listing}"]) == 0
    assert "4 images in 2 classes" in capsys.readouterr().out
    assert folder.read_manifest(str(root)) == walked
    assert walked[1] == [0, 1, 1, 1] and walked[2] == ["cat", "dog"]


def test_unlabelled_folders_and_damaged_manifests(tmp_path):
    for name in ("b.jpg", "a.png", "c.txt"):
        (tmp_path / name).touch()
    manifest.write_manifest(str(tmp_path))
    assert folder.list_image_folder(str(tmp_path)) == ([f"{tmp_path}/a.png", f"{tmp_path}/b.jpg"], [-1, -1], [])
    path = tmp_path / folder.MANIFEST_NAME
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")  # cut short
    with pytest.raises(
        ValueError,
        match="lists 1 images but says 2: it was cut short; write it again with `python -m vicregl_jax.data.manifest",
    ):
        folder.list_image_folder(str(tmp_path))
    path.write_text("a.png\n")
    with pytest.raises(ValueError, match="is not a vicregl_jax manifest: delete it, or write it again"):
        folder.list_image_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        manifest.main([str(tmp_path / "missing")])


def test_two_processes_of_a_run_prepare_a_shared_tfds_dataset_once_without_a_lock(tmp_path):
    """Two processes joined by jax.distributed open an unprepared dataset at once, with the
    file lock gone (as on gs://): process 0 builds it, process 1 waits and reads it. Then
    each opens it in its own directory (host-local data_dirs): each builds its own copy."""
    code = textwrap.dedent("""
        import contextlib, sys
        import jax
        jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
        import tensorflow_datasets as tfds
        from vicregl_jax.data import sources
        sources.preparation_lock = lambda builder: contextlib.nullcontext()  # no lock, as on gs://
        builds = []
        original = tfds.core.GeneratorBasedBuilder._download_and_prepare
        def counted(self, *args, **kwargs):
            builds.append(self.name)
            return original(self, *args, **kwargs)
        tfds.core.GeneratorBasedBuilder._download_and_prepare = counted
        shared = sources.tfds_source("vicregl_digits", "test", data_dir=sys.argv[3]).num_examples
        shared_builds = len(builds)
        # The same path on every host, a different directory on each (relative to its cwd).
        own = sources.tfds_source("vicregl_digits", "test", data_dir="tfds_local").num_examples
        print("RESULT", jax.process_index(), shared, shared_builds, own, len(builds) - shared_builds, flush=True)
    """)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "XLA_FLAGS": xla_flags(1),
        "JAX_PLATFORMS": "cpu",
    }
    procs = []
    for pid in range(2):
        (tmp_path / f"host{pid}").mkdir()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, str(port), str(pid), str(tmp_path / "shared")],
                env=env,
                cwd=tmp_path / f"host{pid}",
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    # process, examples, builds of the shared dir, examples and builds of its own dir
    assert "RESULT 0 299 1 299 1" in outputs[0], outputs[0][-2000:]
    assert "RESULT 1 299 0 299 1" in outputs[1], outputs[1][-2000:]
    assert os.path.isdir(tmp_path / "host0" / "tfds_local" / "vicregl_digits")
    assert os.path.isdir(tmp_path / "host1" / "tfds_local" / "vicregl_digits")
    assert not [n for n in os.listdir(tmp_path / "shared") if n.startswith(".vicregl_jax_first")]  # markers gone


def test_a_folder_walk_skips_fifos_and_follows_each_linked_folder_once(tmp_path, caplog):
    """A FIFO named like an image is not listed (reading it would block forever), a link back
    up the tree is not followed round (each folder is walked once, by real path), a link to a
    folder outside the tree is followed, and the skips are counted in one warning."""
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.jpg").write_bytes(b"x")
    os.mkfifo(root / "a" / "pipe.jpg")
    (root / "a" / "loop").symlink_to("..")
    (root / "b" / "again").symlink_to(root / "a")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "far.jpg").write_bytes(b"x")
    (root / "b" / "far").symlink_to(outside)
    with caplog.at_level("WARNING"):
        paths, labels, classes = folder.walk_image_folder(str(root))
    assert classes == ["a", "b"]
    assert [os.path.relpath(p, root) for p in paths] == [
        "a/0.jpg",
        "a/1.jpg",
        "a/2.jpg",
        "b/0.jpg",
        "b/1.jpg",
        "b/2.jpg",
        "b/far/far.jpg",
    ]
    assert labels == [0, 0, 0, 1, 1, 1, 1]
    assert "skipped 2 folder links already walked" in caplog.text and "1 entries that are not regular" in caplog.text
    # A FIFO that reaches the reader anyway (listed by a manifest) fails at once, not forever.
    record, error = sources.read_with_retries(lambda: sources.read_file(str(root / "a" / "pipe.jpg")), "pipe.jpg")
    assert record is None and "not a regular file" in error
