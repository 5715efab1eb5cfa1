"""The tf.data iterators: batch format, geometry by content, determinism, hosts, bad input."""

import dataclasses
import io
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vicregl_jax.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropGroup,
    EvalImages,
    ReadOptions,
    augment_views,
    make_eval_iterator,
    make_linear_train_iterator,
    make_pretrain_iterator,
    stream,
    to_global_batch,
)
from vicregl_jax.data.options import resolve_hosts
from vicregl_jax.data.pipeline import EVAL_STD, decode_rgb
from vicregl_jax.data.views import example_index

# Small views, shared by the tests so that XLA compiles each shape once.
GROUPS = (CropGroup(64, 2, (0.08, 1.0)), CropGroup(32, 3, (0.05, 0.4)))
STRIDE = 16
BATCH = 8
HOSTS = dict(process_index=0, process_count=1)


def read(**kwargs):
    """Returns ReadOptions of a single host, with the given fields."""
    return ReadOptions(**HOSTS, **kwargs)


def _save(path, array, fmt=None, mode=None):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, fmt)


@pytest.fixture(scope="session")
def coordinate_folder(tmp_path_factory):
    """One 160 x 224 PNG whose red channel holds the pixel's row and green its column."""
    folder = tmp_path_factory.mktemp("coordinates")
    rows, cols = np.meshgrid(np.arange(160), np.arange(224), indexing="ij")
    _save(folder / "coordinates.png", np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8))
    return f"folder:{folder}"


@pytest.fixture(scope="session")
def labelled_folder(tmp_path_factory):
    """24 tiny images, each alone in its class folder: the label identifies the example."""
    folder = tmp_path_factory.mktemp("labelled")
    for k in range(24):
        (folder / f"class_{k:02d}").mkdir()
        _save(folder / f"class_{k:02d}" / "image.png", np.full((12, 10, 3), k * 10, np.uint8))
    return f"folder:{folder}"


@pytest.fixture(scope="session")
def messy_folder(tmp_path_factory):
    """8 files: grey, RGBA, CMYK, palette and tiny images, and 2 that do not decode."""
    folder = tmp_path_factory.mktemp("messy")
    rgb = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    _save(folder / "00_rgb.jpg", rgb)
    (folder / "01_garbage.jpg").write_bytes(b"this is not an image")
    _save(folder / "02_grey.jpg", rgb[..., 0])
    _save(folder / "03_rgba.png", rgb, mode="RGBA")
    _save(folder / "04_cmyk.jpg", rgb, mode="CMYK")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG")
    (folder / "05_truncated.jpg").write_bytes(buffer.getvalue()[:100])
    _save(folder / "06_palette.png", rgb, mode="P")
    _save(folder / "07_tiny.png", rgb[:2, :3])
    return f"folder:{folder}"


def pretrain(dataset, data_dir=None, num_threads=None, **kwargs):
    args = dict(
        groups=GROUPS,
        stride=STRIDE,
        global_batch_size=BATCH,
        seed=0,
        read=read(data_dir=data_dir, num_threads=num_threads),
    )
    args.update(kwargs)
    return make_pretrain_iterator(dataset, "train", **args)


def coloured(batch):
    """Returns the batch's views of each group after the device colour chain, as numpy."""
    return tuple(np.asarray(augment_views(v, d)) for v, d in zip(batch["views"], batch["draws"]))


def unnormalise(views):
    """Returns normalised views back in [0, 255]."""
    return (views * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255.0


def test_batch_format_on_the_embedded_photos(data_dir):
    it = pretrain("vicregl_photos", data_dir=data_dir)
    batch = next(it)
    assert set(batch) == {"views", "draws", "grids", "label"}
    for group, views, draws, grids, normalised in zip(
        GROUPS, batch["views"], batch["draws"], batch["grids"], coloured(batch)
    ):
        n = group.size // STRIDE
        assert views.shape == (BATCH, group.count, group.size, group.size, 3) and views.dtype == np.uint8
        assert draws["order"].shape == (BATCH, group.count, 4) and draws["sigma"].shape == (BATCH, group.count)
        assert grids.shape == (BATCH, group.count, n, n, 2) and grids.dtype == np.float32
        assert normalised.shape == views.shape and normalised.dtype == np.float32
        pixels = unnormalise(normalised)
        assert pixels.min() > -0.01 and pixels.max() < 255.01
        assert (grids >= 0).all() and (grids <= 512).all()  # photos are at most 512 px
    assert batch["label"].dtype == np.int32 and (batch["label"] == -1).all()  # unlabelled
    assert it.num_examples == 76 and it.num_classes == 0 and it.stats()["step"] == 1


@pytest.mark.parametrize("flip_grid", [False, True])
def test_each_grid_cell_shows_the_pixels_its_coordinates_name(coordinate_folder, flip_grid):
    """On an image whose pixels hold their own (row, col), the mean content of every cell of
    every view equals the cell's grid coordinates: the local loss gets true correspondences."""
    batch = next(pretrain(coordinate_folder, colour="none", flip_grid=flip_grid))
    flipped_views = 0
    for group, views, grids in zip(GROUPS, batch["views"], batch["grids"]):
        n = group.size // STRIDE
        pixels = unnormalise(views)
        cells = pixels.reshape(BATCH, group.count, n, STRIDE, n, STRIDE, 3).mean(axis=(3, 5))
        # Pixel r covers [r, r + 1): a cell's mean pixel index is its centre minus 0.5.
        rows, cols = cells[..., 0] + 0.5, cells[..., 1] + 0.5
        np.testing.assert_allclose(rows, grids[..., 0], atol=0.75)
        matches = np.abs(cols - grids[..., 1]).max(axis=(-1, -2)) < 0.75
        mirrored = np.abs(cols[..., ::-1] - grids[..., 1]).max(axis=(-1, -2)) < 0.75
        assert (matches | mirrored).all()
        if flip_grid:
            assert matches.all()  # flipped views have flipped grids
        flipped_views += int((mirrored & ~matches).sum())
    if not flip_grid:
        assert flipped_views > 0  # the release's default: grids of flipped views stay unflipped


def test_same_seed_same_batches_for_any_parallelism_and_other_seeds_differ(data_dir):
    a = pretrain("vicregl_photos", data_dir=data_dir, num_threads=1)
    b = pretrain("vicregl_photos", data_dir=data_dir, num_threads=3)
    for _ in range(2):
        x, y = next(a), next(b)
        for u, v in zip(x["views"] + x["grids"], y["views"] + y["grids"]):
            np.testing.assert_array_equal(u, v)
        for u, v in zip(x["draws"], y["draws"]):
            for key in u:
                np.testing.assert_array_equal(u[key], v[key])
    c = next(pretrain("vicregl_photos", data_dir=data_dir, seed=1))
    assert not np.array_equal(c["grids"][0], x["grids"][0])


def test_resuming_at_step_k_gives_the_batches_of_an_uninterrupted_run(data_dir):
    whole = pretrain("vicregl_photos", data_dir=data_dir)
    batches = [next(whole) for _ in range(12)]  # 96 positions: crosses the epoch of 76
    resumed = pretrain("vicregl_photos", data_dir=data_dir, start_step=10)
    for step in (10, 11):
        got = next(resumed)
        for u, v in zip(got["views"] + got["grids"], batches[step]["views"] + batches[step]["grids"]):
            np.testing.assert_array_equal(u, v)
        # End to end with the device colour chain: the same normalised views.
        for u, v in zip(coloured(got), coloured(batches[step])):
            np.testing.assert_array_equal(u, v)
    assert resumed.step == 12


def labels_of(iterator, steps):
    return np.stack([next(iterator)["label"] for _ in range(steps)])


SMALL = dict(groups=(CropGroup(16, 1, (0.5, 1.0)),), stride=16, seed=3)


def test_hosts_read_disjoint_parts_that_cover_each_epoch_once(labelled_folder):
    # A folder reads a file per image, so one record per read whatever read_block: each epoch one
    # permutation, each step's global batch cut into host slices.
    small = dict(SMALL, global_batch_size=12)
    single = labels_of(make_pretrain_iterator(labelled_folder, "train", **small, read=read(read_block=1)), 6)
    hosts = [
        labels_of(
            make_pretrain_iterator(
                labelled_folder, "train", **small, read=ReadOptions(process_index=h, process_count=3, read_block=64)
            ),
            6,
        )
        for h in range(3)
    ]
    assert all(h.shape == (6, 4) for h in hosts)  # 12 // 3 images per host per step
    # Host h holds slice h of each global batch: together the hosts make the global batch.
    np.testing.assert_array_equal(np.concatenate(hosts, axis=1), single)
    for epoch in range(3):  # 24 examples = 2 steps of 12
        seen = np.concatenate([h[2 * epoch : 2 * epoch + 2].ravel() for h in hosts])
        np.testing.assert_array_equal(np.sort(seen), np.arange(24))
    assert not np.array_equal(single[0:2], single[2:4])  # each epoch reshuffled


def test_undecodable_images_are_skipped_counted_and_odd_formats_become_rgb(messy_folder):
    it = pretrain(messy_folder, groups=(CropGroup(32, 2, (0.08, 1.0)),))
    batch = next(it)  # one step of 8 = one epoch of the 8 files
    assert batch["views"][0].shape == (BATCH, 2, 32, 32, 3)
    assert np.isfinite(coloured(batch)[0]).all()
    # Each position of the 2 broken files takes a random other example: 2 failures at least
    # (more when a substitute is broken too), all undecodable, none unreadable.
    assert it.num_skipped >= 2 and it.stats()["num_skipped"] == it.num_skipped
    assert it.num_undecodable == it.num_skipped and it.num_unreadable == 0
    assert {name.split("/")[-1] for name in it.failed_examples} == {
        "01_garbage.jpg (undecodable)",
        "05_truncated.jpg (undecodable)",
    }
    first = it.num_skipped
    next(it)
    assert it.num_skipped >= first + 2
    evaluation = make_eval_iterator(
        messy_folder, "train", global_batch_size=4, images=EvalImages(image_size=32, resize_size=36), read=read()
    )
    masks = np.concatenate([b["mask"] for b in evaluation])
    np.testing.assert_array_equal(masks, [1, 0, 1, 1, 1, 0, 1, 1])
    assert evaluation.num_skipped == 2


def test_decoding_makes_rgb_of_grey_rgba_cmyk_and_palette_images(messy_folder):
    folder = messy_folder.split(":", 1)[1]
    for name in ("02_grey.jpg", "03_rgba.png", "04_cmyk.jpg", "06_palette.png", "07_tiny.png"):
        encoded = open(os.path.join(folder, name), "rb").read()
        ours = decode_rgb(encoded).numpy()
        pil = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        assert ours.shape == pil.shape and ours.dtype == np.uint8
        assert np.abs(ours.astype(int) - pil).mean() < 3  # JPEG decoders differ slightly


def test_a_dataset_of_nothing_but_broken_files_fails_with_a_clear_error(tmp_path):
    for k in range(3):
        (tmp_path / f"{k}.jpg").write_bytes(b"broken")
    it = pretrain(f"folder:{tmp_path}", groups=(CropGroup(32, 1, (0.5, 1.0)),))
    with pytest.raises(Exception, match="failed to decode"):
        next(it)
    with pytest.raises(StopIteration):  # closed: its threads are stopped
        next(it)


def test_eval_iterator_one_pass_pads_and_masks_across_hosts(data_dir):
    kwargs = dict(global_batch_size=64, images=EvalImages(image_size=32, resize_size=32))
    single = make_eval_iterator("vicregl_digits", "test", **kwargs, read=read(data_dir=data_dir))
    assert len(single) == 5  # ceil(299 / 64)
    batches = list(single)
    assert len(batches) == 5
    labels = np.concatenate([b["label"] for b in batches])
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == 299 and not masks[299:].any() and (labels[~masks] == -1).all()
    assert set(labels[masks]) == set(range(10))
    b = batches[0]
    assert b["image"].shape == (64, 32, 32, 3) and b["image"].dtype == np.float32
    pixels = b["image"] * np.array(EVAL_STD) + np.array(IMAGENET_MEAN)
    assert pixels.min() > -1e-3 and pixels.max() < 1 + 1e-3
    hosts = [
        list(
            make_eval_iterator(
                "vicregl_digits",
                "test",
                **kwargs,
                read=ReadOptions(data_dir=data_dir, process_index=h, process_count=2),
            )
        )
        for h in range(2)
    ]
    assert len(hosts[0]) == len(hosts[1]) == 5  # every host runs the same number of steps
    joined = np.concatenate([np.concatenate([hosts[0][s]["label"], hosts[1][s]["label"]]) for s in range(5)])
    np.testing.assert_array_equal(joined, labels)
    tail = make_eval_iterator("vicregl_digits", "test", start_step=3, **kwargs, read=read(data_dir=data_dir))
    assert len(tail) == 2
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in tail]), labels[3 * 64 :])


def test_block_reads_give_each_host_whole_windows_that_cover_each_epoch_once(labelled_folder, monkeypatch):
    """Blocks of 4, windows of 12 (3 steps of 4 per host): in round r, hosts 0 and 1 serve
    windows 2r and 2r + 1, together epoch r of the 24 examples, each window three whole blocks
    in the order the stream's functions give; a start in the middle of a window is a seek."""
    options = dict(read_block=4, shuffle_window=12)
    # The folder read as a source that reads a run in one request (ArrayRecord): its labels name
    # its examples. What is tested is the order.
    opened = ReadOptions.open
    monkeypatch.setattr(ReadOptions, "open", lambda self, *a: dataclasses.replace(opened(self, *a), reads_runs=True))

    def host(h, start_step=0):
        read_h = ReadOptions(process_index=h, process_count=2, **options)
        it = make_pretrain_iterator(
            labelled_folder, "train", **SMALL, global_batch_size=8, read=read_h, start_step=start_step
        )
        return it

    hosts = [labels_of(host(h), 6) for h in range(2)]  # (6 steps, 4 images)
    hosts_2 = resolve_hosts(8, 0, 2), resolve_hosts(8, 1, 2)
    for r in range(2):
        windows = [h[3 * r : 3 * r + 3].ravel() for h in hosts]
        np.testing.assert_array_equal(np.sort(np.concatenate(windows)), np.arange(24))
        for window in windows:  # three whole blocks of consecutive records
            np.testing.assert_array_equal(np.bincount(window // 4, minlength=6)[np.unique(window // 4)], [4, 4, 4])
    for h, labels in enumerate(hosts):
        positions = tf.concat([stream.step_positions(t, hosts_2[h], 12) for t in range(6)], 0)
        want = [int(example_index(p, 24, 3, True, 4, 12)) for p in positions]
        np.testing.assert_array_equal(labels.ravel(), want)
    assert not np.array_equal(hosts[0][0:3], hosts[0][3:6])  # each epoch reshuffled
    np.testing.assert_array_equal(labels_of(host(1, start_step=4), 2), hosts[1][4:6])


def test_linear_train_iterator_augments_repeats_and_resumes(data_dir):
    kwargs = dict(global_batch_size=BATCH * 8, seed=0, images=EvalImages(image_size=32), read=read(data_dir=data_dir))
    it = make_linear_train_iterator("vicregl_digits", "test", **kwargs)
    batches = [next(it) for _ in range(6)]  # 384 > 299 examples: into the second epoch
    assert all(b["mask"].all() for b in batches)
    assert batches[0]["image"].shape == (64, 32, 32, 3)
    assert set(np.concatenate([b["label"] for b in batches])) == set(range(10))
    resumed = next(make_linear_train_iterator("vicregl_digits", "test", start_step=5, **kwargs))
    np.testing.assert_array_equal(resumed["image"], batches[5]["image"])


def test_to_global_batch_shards_the_batch_over_the_mesh(labelled_folder):
    mesh = jax.make_mesh((8,), ("data",))
    batch = next(pretrain(labelled_folder, groups=(CropGroup(16, 2, (0.5, 1.0)),)))
    arrays = to_global_batch(batch, mesh)
    views = arrays["views"][0]
    assert views.shape == batch["views"][0].shape and len(views.addressable_shards) == 8
    assert views.dtype == np.uint8 and arrays["draws"][0]["order"].sharding.spec[0] == "data"
    assert views.sharding.spec[0] == "data"
    np.testing.assert_array_equal(np.asarray(views), batch["views"][0])
    np.testing.assert_array_equal(np.asarray(arrays["label"]), batch["label"])
    with pytest.raises(ValueError, match="no axis 'batch'"):
        to_global_batch(batch, mesh, data_axis="batch")
    assert (batch["label"] >= 0).all()
    unlabelled = next(pretrain(labelled_folder, groups=(CropGroup(16, 2, (0.5, 1.0)),), with_labels=False))
    assert (unlabelled["label"] == -1).all()


def test_user_errors_name_the_value_and_the_fix(tmp_path, data_dir):
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'.*folder:"):
        pretrain("no_such_dataset", data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrain(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="no images"):
        pretrain(f"folder:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="manual_dir=.*tfds build imagenet2012"):
        pretrain("imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no split 'validation'.*'test', 'train'"):
        make_eval_iterator("vicregl_digits", "validation", global_batch_size=8, read=read(data_dir=data_dir))
    with pytest.raises(ValueError, match="global_batch_size=10 is not a positive multiple of process_count=4"):
        pretrain(
            "vicregl_photos",
            global_batch_size=10,
            read=ReadOptions(data_dir=data_dir, process_index=0, process_count=4),
        )
    with pytest.raises(ValueError, match="colour='gpu'"):
        pretrain("vicregl_photos", data_dir=data_dir, colour="gpu")
    with pytest.raises(ValueError, match="jpeg_dct_method='FAST'"):
        ReadOptions(jpeg_dct_method="FAST")
    with pytest.raises(ValueError, match="resize_size=30 is smaller than image_size=32"):
        EvalImages(image_size=32, resize_size=30)
    with pytest.raises(ValueError, match=r"interpolation='nearest': use one of \('bicubic', 'bilinear'\)"):
        EvalImages(interpolation="nearest")
    with pytest.raises(ValueError, match=r"resize='cv2': use one of \('pillow', 'tensorflow'\)"):
        ReadOptions(resize="cv2")
    with pytest.raises(ValueError, match="crop size 60 is not divisible by the backbone stride 16"):
        pretrain("vicregl_photos", data_dir=data_dir, groups=(CropGroup(60, 2, (0.08, 1.0)),))


def test_a_tfds_dataset_stored_as_tfrecord_is_read_from_memory_or_says_how_to_convert(tmp_path):
    import tensorflow_datasets as tfds

    from vicregl_jax.data import embedded

    embedded.register()
    tfds.builder("vicregl_digits", data_dir=str(tmp_path)).download_and_prepare(file_format="tfrecord")
    kwargs = dict(global_batch_size=64, images=EvalImages(image_size=32, resize_size=32))
    batches = list(make_eval_iterator("vicregl_digits", "test", **kwargs, read=read(data_dir=str(tmp_path))))
    labels = np.concatenate([b["label"] for b in batches])[:299]
    assert set(labels) == set(range(10))
    with pytest.raises(ValueError, match="stored as TFRecord.*tfds convert_format"):
        make_eval_iterator(
            "vicregl_digits", "test", **kwargs, read=read(data_dir=str(tmp_path), max_in_memory_bytes=1000)
        )


def test_processes_sharing_a_data_dir_prepare_a_dataset_once(tmp_path):
    """Two processes that open an unprepared dataset at once (the hosts of a run, sharing a
    data_dir) both get it: one prepares under a lock, the other waits and reads it."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys; from vicregl_jax.data import sources\n"
        "print(sources.tfds_source('vicregl_digits', 'test', data_dir=sys.argv[1]).num_examples)\n"
    )
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert out.split()[-1] == "299"
