"""Named release weights (download, cache, verification, load) and features, offline.

The release's folder is played by a loopback HTTP server (http.server in a thread, with Range
requests) serving files written by torch in the release's layouts from tiny architectures:
a plain backbone state_dict and a full checkpoint {"epoch", "model": module.*, "optimizer"}.
"""

import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import tensorflow as tf
import torch
from flax import nnx
from PIL import Image
from tiny import tiny_config

from references.torch_modules import TORCH_BACKBONES, DataParallelLike, TorchVICRegL, nchw, randomize_torch_
from vicregl_jax import build, download, models, sharding
from vicregl_jax import extract as features_lib
from vicregl_jax import weights as weights_lib
from vicregl_jax.data import EvalImages, augment
from vicregl_jax.evaluate import common

torch.set_num_threads(1)
HEADS = {"mlp": "32-32-16", "maps_mlp": "24-24-8", "num_classes": 10}
EVAL = EvalImages()  # the evaluations' preprocessing
NAMES = {"resnet_test_alpha0.9": ("resnet_test", 0.9), "convnext_test_alpha0.75": ("convnext_test", 0.75)}


class ReleaseServer(http.server.ThreadingHTTPServer):
    """Serves `files` by name; `drops[name] = (times, nbytes)` cuts that many responses short."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.drops, self.requests = {}, {}, []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        self.server.requests.append((name, self.headers.get("Range")))
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers["Range"] else 0
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        times, cut = self.server.drops.get(name, (0, 0))
        if times:  # the connection closes after `cut` bytes of what was announced
            self.server.drops[name] = (times - 1, cut)
            body = body[:cut]
        self.wfile.write(body)


def _pth_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release():
    """The server, the torch models whose files it serves, and the registry pointing at it."""
    server = ReleaseServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    references = {}
    with torch.no_grad():
        for seed, (name, (arch, alpha)) in enumerate(NAMES.items()):
            net = DataParallelLike(
                TorchVICRegL(
                    TORCH_BACKBONES[arch](), models.feature_dim(arch), models.backbone_norm(arch), alpha=alpha, **HEADS
                )
            )
            randomize_torch_(net, seed=seed + 3)
            net.eval()
            references[name] = net.module
            server.files[f"{name}.pth"] = _pth_bytes(net.module.backbone.state_dict())
            server.files[f"{name}_fullckpt.pth"] = _pth_bytes(
                {"epoch": 100, "model": net.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
            )
    base = "https://dl.fbaipublicfiles.com/vicregl/"
    entries = {
        name: weights_lib.Release(name, arch, alpha, f"{base}{name}.pth", f"{base}{name}_fullckpt.pth")
        for name, (arch, alpha) in NAMES.items()
    }
    saved = dict(weights_lib.RELEASES)
    weights_lib.RELEASES.update(entries)
    yield server, references
    weights_lib.RELEASES.clear()
    weights_lib.RELEASES.update(saved)
    server.shutdown()
    server.server_close()


@pytest.fixture
def cache(release, tmp_path, monkeypatch):
    """An empty cache folder, the registry's addresses redirected to the server."""
    server, _ = release
    monkeypatch.setenv(weights_lib.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(weights_lib.URL_ENV, server.url)
    server.requests.clear()
    server.drops.clear()
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def loaded(release, tmp_path_factory):
    """(cache folder, {name: (model, config)}, the requests made): a backbone file and a full
    checkpoint loaded once into a cache shared by the tests that only read it (the cache and
    the server's address given as arguments)."""
    server, _ = release
    folder = str(tmp_path_factory.mktemp("shared_cache"))
    server.requests.clear()
    out = {
        name: weights_lib.load(name, cache=folder, base_url=server.url, progress=False)
        for name in ("resnet_test_alpha0.9", "convnext_test_alpha0.75_fullckpt")
    }
    return folder, out, list(server.requests)


@pytest.fixture
def shared(release, loaded, monkeypatch):
    """loaded, with the environment pointing at its cache and at the server."""
    monkeypatch.setenv(weights_lib.CACHE_ENV, loaded[0])
    monkeypatch.setenv(weights_lib.URL_ENV, release[0].url)
    release[0].requests.clear()
    return loaded


def _images(seed, shape=(5, 64, 96, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _torch_features(net, images):
    """Returns the reference's (maps (B, N, C), pooled) of uint8 images, normalised as the
    release evaluates: ToTensor then Normalize(mean, std), in torch."""
    x = nchw(images).float() / 255.0
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (features_lib.EVAL_MEAN, features_lib.EVAL_STD))
    x = (x - mean) / std
    with torch.no_grad():
        return net.backbone(x)


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


# --------------------------------------------------------------------------------------------
# Download, cache, verification
# --------------------------------------------------------------------------------------------


def test_first_download_is_recorded_then_the_cache_serves_without_a_request(release, loaded, cache):
    server, _ = release
    folder, out, requests = loaded
    assert requests == [("resnet_test_alpha0.9.pth", None), ("convnext_test_alpha0.75_fullckpt.pth", None)]
    for name in ("resnet_test_alpha0.9", "convnext_test_alpha0.75_fullckpt"):
        path = os.path.join(folder, "files", f"{name}.pth")
        record = json.loads(Path(path + ".json").read_text())
        served = server.files[f"{name}.pth"]
        assert record["sha256"] == hashlib.sha256(served).hexdigest() and record["size"] == len(served)
        assert record["url"] == f"{server.url}/{name}.pth" and Path(path).read_bytes() == served
    backbone, config = out["resnet_test_alpha0.9"]
    assert isinstance(backbone, models.ResNet)  # a backbone file holds the backbone alone
    assert (config.model.arch, config.loss.alpha) == ("resnet_test", 0.9)
    model, config = out["convnext_test_alpha0.75_fullckpt"]
    assert (model.arch, model.alpha, config.model.mlp, config.model.maps_mlp) == (
        "convnext_test",
        0.75,
        "32-32-16",
        "24-24-8",
    )
    assert os.path.exists(os.path.join(folder, "converted", "convnext_test_alpha0.75_fullckpt", "config.json"))

    # Cached and converted: no request, the same weights (torch.hub's spelling of the name too).
    again, _ = weights_lib.load("release:resnet_test_alpha0p9", cache=folder, base_url=server.url)
    assert server.requests == []
    images = _images(0)
    np.testing.assert_array_equal(
        np.asarray(features_lib.features(again, images).maps), np.asarray(features_lib.features(backbone, images).maps)
    )


def test_a_truncated_download_resumes_with_a_range_request(release, cache):
    server, _ = release
    data = server.files["convnext_test_alpha0.75.pth"]
    (cache / "files").mkdir(parents=True)
    (cache / "files" / "convnext_test_alpha0.75.pth.part").write_bytes(data[:1000])
    path = weights_lib.fetch_file("convnext_test_alpha0.75", progress=False)
    assert server.requests == [("convnext_test_alpha0.75.pth", "bytes=1000-")]
    assert Path(path).read_bytes() == data
    assert not os.path.exists(path + ".part")


def test_a_server_dropping_mid_way_is_resumed_or_named(release, cache):
    server, _ = release
    name, data = "convnext_test_alpha0.75.pth", server.files["convnext_test_alpha0.75.pth"]
    server.drops[name] = (1, 700)  # once: the next attempt of the same call resumes
    path = weights_lib.fetch_file("convnext_test_alpha0.75", progress=False)
    assert server.requests == [(name, None), (name, "bytes=700-")] and Path(path).read_bytes() == data

    os.remove(path)
    os.remove(path + ".json")
    server.requests.clear()
    server.drops[name] = (download.ATTEMPTS, 500)  # every attempt of one call drops
    with pytest.raises(download.DownloadError) as error:
        weights_lib.fetch_file("convnext_test_alpha0.75", progress=False)
    message = str(error.value)
    assert "\n" not in message and f"{server.url}/{name}" in message and f"-o {path} " in message
    assert "the connection closed" in message and f"kept in {path}.part" in message
    assert os.path.getsize(path + ".part") == 500 * download.ATTEMPTS
    weights_lib.fetch_file("convnext_test_alpha0.75", progress=False)  # the next call finishes it
    assert Path(path).read_bytes() == data and server.requests[-1] == (name, f"bytes={500 * download.ATTEMPTS}-")


def test_missing_file_and_no_server_give_one_line_with_the_address_and_the_place(release, cache, monkeypatch):
    server, _ = release
    name = "resnet_test_alpha0.9_fullckpt.pth"
    data = server.files.pop(name)
    try:
        with pytest.raises(download.DownloadError, match=r"HTTP 404") as error:
            weights_lib.load("resnet_test_alpha0.9_fullckpt", progress=False)
    finally:
        server.files[name] = data
    message = str(error.value)
    assert "\n" not in message and f"curl -L -o {cache / 'files' / name} {server.url}/{name}" in message
    assert len(server.requests) == 1  # a 404 is not retried

    with socket.socket() as s:  # a port nothing listens on: offline
        s.bind(("127.0.0.1", 0))
        offline = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv(weights_lib.URL_ENV, offline)
    with pytest.raises(download.DownloadError) as error:
        weights_lib.load("resnet_test_alpha0.9", progress=False)
    message = str(error.value)
    assert "\n" not in message and f"curl -L -o {cache / 'files' / 'resnet_test_alpha0.9.pth'} {offline}/" in message
    with pytest.raises(FileNotFoundError, match=r"nor a released model \(resnet50_alpha0.9, "):
        weights_lib.load("resnet51_alpha0.9")


def test_a_file_changed_since_the_first_download_is_refused(release, cache):
    server, _ = release
    name = "resnet_test_alpha0.9.pth"
    path = weights_lib.fetch_file("resnet_test_alpha0.9", progress=False)
    record = Path(path + ".json").read_text()
    os.remove(path)  # e.g. deleted to download again; meanwhile the server's file changed
    original = server.files[name]
    other = DataParallelLike(TorchVICRegL(TORCH_BACKBONES["resnet_test"](), 64, "batch", alpha=0.9, **HEADS))
    server.files[name] = _pth_bytes(other.module.backbone.state_dict())
    try:
        with pytest.raises(download.DownloadError, match="refused .* nothing in the cache was changed") as error:
            weights_lib.load("resnet_test_alpha0.9", progress=False)
    finally:
        server.files[name] = original
    assert f"delete {path}.json to accept the new one" in str(error.value)
    assert Path(path + ".json").read_text() == record
    assert not os.path.exists(path) and not os.path.exists(path + ".part")
    assert not os.path.exists(cache / "converted")

    # The cached file changed on disk: refused at its next use, and left as it is.
    weights_lib.fetch_file("resnet_test_alpha0.9", progress=False)
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 1
    Path(path).write_bytes(bytes(damaged))
    with pytest.raises(download.DownloadError, match="changed or damaged since; delete it to download it again"):
        weights_lib.load("resnet_test_alpha0.9", progress=False)
    assert Path(path).read_bytes() == bytes(damaged)


def _read_only(folder, on: bool):
    """Makes a folder tree read-only (or writable again); as root, where modes do not bind, with
    the immutable attribute. Returns whether it worked."""
    if os.geteuid() != 0:
        for root, _, files in os.walk(folder):
            for entry in [root] + [os.path.join(root, f) for f in files]:
                os.chmod(entry, (0o555 if os.path.isdir(entry) else 0o444) if on else 0o755)
        return True
    flag = "+i" if on else "-i"
    return (
        shutil.which("chattr") is not None
        and subprocess.run(["chattr", "-R", flag, str(folder)], capture_output=True, check=False).returncode == 0
    )


def test_a_read_only_cache_loads_what_it_holds_and_names_what_it_cannot_write(release, loaded, tmp_path):
    server, _ = release
    folder, out, _ = loaded
    empty = tmp_path / "empty"
    empty.mkdir()
    if not _read_only(folder, True):
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        _read_only(empty, True)
        server.requests.clear()
        backbone, _ = weights_lib.load("resnet_test_alpha0.9", cache=folder, base_url=server.url)
        assert server.requests == []
        images = _images(1)
        np.testing.assert_array_equal(
            np.asarray(features_lib.features(backbone, images).pooled),
            np.asarray(features_lib.features(out["resnet_test_alpha0.9"][0], images).pooled),
        )
        with pytest.raises(download.DownloadError) as error:
            weights_lib.load("convnext_test_alpha0.75", cache=str(empty), base_url=server.url)
        assert "\n" not in str(error.value) and f"cannot create the cache folder {empty / 'files'}" in str(error.value)
        assert f"set ${weights_lib.CACHE_ENV} to another folder" in str(error.value)
        with pytest.raises(download.DownloadError, match=f"read-only cache folder {folder}/files"):
            weights_lib.load("convnext_test_alpha0.75", cache=folder, base_url=server.url)
    finally:
        _read_only(folder, False)
        _read_only(empty, False)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def test_features_equal_the_release_networks_and_the_evaluations(release, shared):
    server, references = release
    _, out, _ = shared
    images = _images(2)  # 5 images on 8 devices: the batch is padded and the padding dropped
    for name, heads in (("resnet_test_alpha0.9", False), ("convnext_test_alpha0.75_fullckpt", True)):
        model, _ = out[name]
        net = references[name.removesuffix("_fullckpt")]
        got = features_lib.features(model, images, heads=heads)
        maps, pooled = _torch_features(net, images)
        b, n, c = maps.shape
        assert got.maps.shape == (b, 2, 3, c) and n == 6 and got.maps.dtype == np.float32
        _close(got.maps, maps.reshape(b, 2, 3, c).numpy())  # row-major cells, as the release flattens them
        _close(got.pooled, pooled.numpy())
        if heads:
            with torch.no_grad():
                _close(got.embeddings, net.projector(pooled).numpy())
                _close(got.local_embeddings, net.maps_projector(maps.reshape(b * n, c)).reshape(b, 2, 3, -1).numpy())
        else:
            assert got.embeddings is None and got.local_embeddings is None

        # The evaluations' feature function, on the images their input pipeline normalises.
        normalised = augment.normalise(tf.cast(images, tf.float32) / 255.0, EVAL.mean, EVAL.std).numpy()
        batch = jax.device_put(np.concatenate([normalised] * 8)[:8], sharding.batch_sharding(sharding.make_mesh()))
        backbone = common.load_backbone(
            tiny_config("unused", {"model.arch": model.arch if heads else "resnet_test"}), None, f"release:{name}"
        ).backbone
        eval_maps, eval_pooled = common.make_feature_fn(backbone, sharding.make_mesh())(batch)
        # TensorFlow's normalisation and XLA's differ by an ulp here and there: the same
        # function of the same weights, within float32 rounding.
        ours = (images / np.float32(255.0) - np.float32(EVAL.mean)) / np.float32(EVAL.std)
        np.testing.assert_allclose(normalised, ours, rtol=0, atol=1e-6)
        _close(np.asarray(eval_pooled)[:5], np.asarray(got.pooled), tol=1e-5)
        _close(np.asarray(eval_maps)[:5].reshape(got.maps.shape), np.asarray(got.maps), tol=1e-5)
    assert server.requests == []
    assert (features_lib.EVAL_MEAN, features_lib.EVAL_STD, features_lib.EVAL_INTERPOLATION) == (
        EVAL.mean,
        EVAL.std,
        EVAL.interpolation,
    )


def test_resize_crop_and_cell_locations(loaded):
    _, out, _ = loaded
    backbone, _ = out["resnet_test_alpha0.9"]
    whole = features_lib.features(backbone, _images(3, (2, 64, 96, 3)))
    np.testing.assert_array_equal(whole.locations[1, :, :, 0], [[16, 16, 16], [48, 48, 48]])  # 32-pixel cells
    np.testing.assert_array_equal(whole.locations[0, :, :, 1], [[16, 48, 80], [16, 48, 80]])

    wide, tall = _images(4, (1, 100, 150, 3))[0], _images(5, (1, 120, 90, 3))[0]
    crops, _ = features_lib.preprocess([wide, tall], resize=64, crop=64)
    for image, got in zip((wide, tall), crops):  # Pillow's bilinear resize, then the centre crop
        h, w = image.shape[:2]
        size = (64, int(64 * w / h)) if h <= w else (int(64 * h / w), 64)
        resized = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        top, left = round((size[0] - 64) / 2), round((size[1] - 64) / 2)
        np.testing.assert_array_equal(got, resized[top : top + 64, left : left + 64])
    result = features_lib.features(backbone, [wide, tall], resize=64, crop=64)
    # wide: resized to 64 x 96, crop from column 16 = 25 original pixels, 100 x 100 of them
    np.testing.assert_allclose(result.locations[0], [[[25, 50], [25, 100]], [[75, 50], [75, 100]]], rtol=1e-6)
    # tall: resized to 85 x 64, crop from row 10 = 10 * 120 / 85 original pixels
    rows = 10 * 120 / 85 + np.array([0.25, 0.75]) * 64 * 120 / 85
    np.testing.assert_allclose(result.locations[1, :, 0, 0], rows, rtol=1e-6)
    np.testing.assert_allclose(result.locations[1, 0, :, 1], [22.5, 67.5], rtol=1e-6)
    direct = features_lib.features(backbone, crops)
    np.testing.assert_array_equal(np.asarray(result.maps), np.asarray(direct.maps))


def test_the_batched_extractor_equals_one_call(shared):
    _, out, _ = shared
    model, _ = out["convnext_test_alpha0.75_fullckpt"]
    images = _images(6, (11, 64, 96, 3))
    batched = features_lib.Extractor(model, heads=True).all(list(images), batch_size=5)  # rounded up to 8
    for key in ("pooled", "maps", "locations", "embeddings", "local_embeddings"):
        value = getattr(batched, key)
        assert isinstance(value, np.ndarray) and value.shape[0] == 11 and value.dtype == np.float32
        for rows in (slice(0, 8), slice(8, 11)):  # the same compiled batch of 8, padded or not
            one = features_lib.features(model, images[rows], heads=True)
            np.testing.assert_array_equal(value[rows], np.asarray(getattr(one, key)))


def test_feature_errors_are_one_line(loaded):
    _, out, _ = loaded
    backbone, _ = out["resnet_test_alpha0.9"]
    with pytest.raises(ValueError, match=r"heads=True needs the whole model .* full checkpoint \(NAME_fullckpt\)"):
        features_lib.features(backbone, _images(0), heads=True)
    with pytest.raises(ValueError, match=r"images is float32 \(2, 8, 8, 3\): pass uint8 RGB images"):
        features_lib.features(backbone, np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"different sizes .* pass crop=SIZE"):
        features_lib.features(backbone, [_images(0)[0], _images(0)[0, :32]])
    model, _ = out["convnext_test_alpha0.75_fullckpt"]
    with pytest.raises(ValueError, match="images of 16 x 16 are too small for this backbone"):
        features_lib.features(model, np.zeros((1, 16, 16, 3), np.uint8))


def test_release_names_as_init_weights_and_evaluation_weights(release, shared):
    server, _ = release
    folder, out, _ = shared
    config = tiny_config("unused", {"model.init_weights": "release:resnet_test_alpha0.9_fullckpt"})
    with pytest.raises(download.DownloadError, match="HTTP 404"):  # checked (downloaded) before any data
        build._check_init_weights(tiny_config("unused", {"model.init_weights": "release:resnet50_alpha0.9"}))
    build._check_init_weights(config)  # downloads the full checkpoint (build_run's check)
    assert weights_lib.resolve("release:resnet_test_alpha0.9_fullckpt", as_file=True) == os.path.join(
        folder, "files", "resnet_test_alpha0.9_fullckpt.pth"
    )
    assert weights_lib.resolve("runs/x") == "runs/x"
    name = "release:convnext_test_alpha0.75_fullckpt"
    backbone, description, arch = common.load_backbone(config, None, name)
    assert (
        arch == "convnext_test"
        and description == "convnext_test from the release's convnext_test_alpha0.75_fullckpt.pth"
    )
    assert [r[0] for r in server.requests] == ["resnet50_alpha0.9.pth", "resnet_test_alpha0.9_fullckpt.pth"]
    expected = nnx.state(out["convnext_test_alpha0.75_fullckpt"][0].backbone, (nnx.Param, nnx.BatchStat))
    chex.assert_trees_all_equal(nnx.state(backbone, (nnx.Param, nnx.BatchStat)), expected)
