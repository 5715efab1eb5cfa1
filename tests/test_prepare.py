"""Preparing a TFDS dataset into a bucket (vicregl_jax.data.prepare), end to end on the Storage
emulator: TFDS's real imagenet2012 builder on tars shaped like ImageNet's (a train tar of
per-class tars, a validation tar), killed in the middle of its upload and resumed, while a
reader watches; then read back through the production reader (ArrayRecord from gs://)."""

import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from storage_fixture import BUCKET
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

from vicregl_jax.data import prepare, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES, PER_CLASS, VALIDATION = 6, 12, 24
SHARDS_PER_SPLIT = 12  # 24 shards in all: enough to stop the upload in its middle


def _jpeg(rng) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def imagenet_manual(tmp_path_factory):
    """(manual_dir, {jpeg bytes: label} of train, of validation): ILSVRC2012_img_train.tar (a tar
    of per-synset tars) and ILSVRC2012_img_val.tar, as image-net.org serves them, tiny."""
    rng = np.random.default_rng(0)
    manual = tmp_path_factory.mktemp("imagenet_manual")
    synsets = tfds.features.ClassLabel(names_file=imagenet_common.label_names_file()).names
    train = {}
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for k in range(CLASSES):
            label = 37 * k + 5  # spread over the 1000 synsets
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(PER_CLASS):
                    data = _jpeg(rng)
                    train[data] = label
                    _add(tar, f"{synsets[label]}_{i}.JPEG", data)
            _add(outer, f"{synsets[label]}.tar", inner.getvalue())
    # Validation labels: TFDS's list, in the order of the sorted file names.
    labels_file = os.path.join(os.path.dirname(imagenet_common.__file__), "validation_labels.txt")
    with open(labels_file) as f:
        val_synsets = f.read().split()
    validation = {}
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in range(VALIDATION):
            data = _jpeg(rng)
            validation[data] = synsets.index(val_synsets[i])
            _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", data)
    return str(manual), train, validation


def read_all(dataset, split, data_dir):
    """Returns {image bytes: label} of a split, read through the production source."""
    source = sources.open_source(dataset, split, data_dir=data_dir)
    records, _, errors = source.read_records(list(range(source.num_examples)))
    assert errors == [None] * source.num_examples
    out = {}
    for record in records:
        image, label = source.parse(tf.constant(record), tf.constant(-1, tf.int64))
        out[image.numpy()] = int(label)
    return out


class Watcher(threading.Thread):
    """Polls whether data_dir's imagenet2012 is prepared, as the production reader asks it
    (prepare.prepared_builder); once it is, counts its examples: every observation is recorded."""

    def __init__(self, data_dir, expected):
        super().__init__(daemon=True)
        self.data_dir, self.expected = data_dir, expected
        self.stop, self.seen = threading.Event(), []

    def run(self):
        while not self.stop.is_set():
            builder = prepare.prepared_builder(tfds.builder("imagenet2012", data_dir=self.data_dir))
            if builder is None:
                self.seen.append("absent")
            else:
                try:
                    counts = {s: len(builder.as_data_source(s)) for s in ("train", "validation")}
                    self.seen.append("whole" if counts == self.expected else f"partial {counts}")
                except Exception as error:  # noqa: BLE001 - a half dataset that fails to open is a finding
                    self.seen.append(f"broken {type(error).__name__}: {error}")
            time.sleep(0.2)


def prepare_command(data_dir, manual, staging):
    return [
        sys.executable,
        "-m",
        "vicregl_jax.data.prepare",
        "imagenet2012",
        f"--data_dir={data_dir}",
        f"--manual_dir={manual}",
        f"--staging_dir={staging}",
        "--upload_workers=1",
        f"--num_shards={SHARDS_PER_SPLIT}",
    ]


def test_a_preparation_killed_in_its_upload_resumes_without_resending_shards_and_no_reader_sees_half_of_it(
    storage_emulator, imagenet_manual, tmp_path, capsys
):
    manual, train, validation = imagenet_manual
    data_dir = f"gs://{BUCKET}/prepare_cli"
    prefix = "prepare_cli/imagenet2012/5.1.0/"
    env = {**os.environ, "PYTHONPATH": ROOT}
    watcher = Watcher(data_dir, {"train": len(train), "validation": len(validation)})
    watcher.start()
    storage_emulator.slow_uploads(0.2)
    process = subprocess.Popen(
        prepare_command(data_dir, manual, tmp_path / "staging"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    shards = {}
    deadline = time.monotonic() + 120
    while len(shards) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        shards = {n: o for n, o in storage_emulator.list_objects(BUCKET, prefix).items() if prepare.SHARD.search(n)}
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0]
    assert process.returncode == -signal.SIGKILL, output
    total = 2 * SHARDS_PER_SPLIT
    assert 3 <= len(shards) < total, output
    before = {n: o for n, o in storage_emulator.list_objects(BUCKET, prefix).items() if prepare.SHARD.search(n)}
    assert prefix + "dataset_info.json" not in storage_emulator.list_objects(BUCKET, prefix)
    early = tfds.builder("imagenet2012", data_dir=data_dir)  # a reader's builder, made before the metadata

    storage_emulator.slow_uploads(0)
    prepare.main(prepare_command(data_dir, manual, tmp_path / "staging")[3:])  # resumed in this process
    assert f"({total - len(before)} shards uploaded, {len(before)} already there)" in capsys.readouterr().out
    objects = storage_emulator.list_objects(BUCKET, prefix)
    after = {n: o for n, o in objects.items() if prepare.SHARD.search(n)}
    assert len(after) == total
    assert all(after[n]["generation"] == o["generation"] for n, o in before.items())  # not uploaded again
    staged = tmp_path / "staging" / "imagenet2012" / "5.1.0"
    assert all(int(o["size"]) == os.path.getsize(staged / n.rsplit("/", 1)[1]) for n, o in after.items())
    # The metadata came last: dataset_info.json is the newest object.
    newest = max(objects.values(), key=lambda o: int(o["generation"]))
    assert newest["name"] == prefix + "dataset_info.json"

    time.sleep(0.3)
    watcher.stop.set()
    watcher.join(timeout=30)
    assert "absent" in watcher.seen and watcher.seen[-1] == "whole", watcher.seen[-5:]
    assert all(s in ("absent", "whole") for s in watcher.seen), [s for s in watcher.seen if s != "absent"][:3]
    assert read_all("imagenet2012", "validation", data_dir) == validation
    # The builder made before dataset_info.json was written keeps the code's metadata (TFRecord)
    # though is_prepared() now says yes: opened as it is, the dataset looks broken (the race a
    # reader checking a builder it made earlier runs into); prepared_builder reads it again.
    assert early.is_prepared()
    with pytest.raises(NotImplementedError, match="FileFormat.TFRECORD"):
        early.as_data_source("validation")
    assert len(prepare.prepared_builder(early).as_data_source("validation")) == len(validation)

    # Once prepared, the command finds it so and uploads nothing.
    prepare.main(prepare_command(data_dir, manual, tmp_path / "staging")[3:])
    assert capsys.readouterr().out.endswith("5.1.0 already.\n")


def test_a_run_on_a_gs_data_dir_prepares_through_a_local_staging_folder_and_reads_arrayrecord_from_the_bucket(
    storage_emulator, imagenet_manual, tmp_path, monkeypatch
):
    manual, train, _ = imagenet_manual
    monkeypatch.setenv(prepare.STAGING_ENV, str(tmp_path / "staging"))
    data_dir = f"gs://{BUCKET}/run_tfds"
    source = sources.tfds_source("imagenet2012", "train", data_dir=data_dir, manual_dir=manual)
    assert source.num_examples == len(train) and source.num_classes == 1000
    assert (tmp_path / "staging" / "imagenet2012" / "5.1.0" / "dataset_info.json").exists()
    assert read_all("imagenet2012", "train", data_dir) == train


def test_too_little_staging_space_is_one_line_naming_the_space_and_the_flag(
    storage_emulator, imagenet_manual, tmp_path, monkeypatch
):
    manual, _, _ = imagenet_manual
    monkeypatch.setattr(prepare, "STAGING_MARGIN", 1e9)  # the tars' size times 1e9: more than any disk
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(
            [
                "imagenet2012",
                f"--data_dir=gs://{BUCKET}/no_space",
                f"--manual_dir={manual}",
                f"--staging_dir={tmp_path}",
            ]
        )
    message = str(exit_info.value.code)
    assert message.startswith("error: preparing needs ") and "GiB" in message and "--staging_dir=DIR" in message
    assert "\n" not in message
    assert not storage_emulator.list_objects(BUCKET, "no_space/")
