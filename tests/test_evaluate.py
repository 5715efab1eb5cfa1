"""Evaluations on tiny data where the answer is known, the runners end to end, and the demo."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import free_port, worker_env
from PIL import Image

from vicregl_jax.evaluate import common, correspond, knn, linear

# ------------------------------------------------------------------------------------------
# kNN and linear classification
# ------------------------------------------------------------------------------------------


def separable(seed, n_per_class=20, classes=5, dim=16):
    rng = np.random.default_rng(seed)
    centres = 5.0 * rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    return (centres[labels] + 0.3 * rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_knn_on_separable_classes_is_perfect():
    x, y = separable(0)
    xt, yt = separable(0, n_per_class=6)
    out = knn.knn_classify(x, y, xt, yt, k=5)
    assert out["top1"] == 100.0 and out["top5"] == 100.0


def test_knn_weighted_vote_by_hand():
    """Two neighbours of class 1 at similarity 0.6 outvote... or not: exp(s / T) weights decide."""
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]], np.float32)
    labels = np.array([0, 1, 1])
    test = np.array([[1.0, 0.0]], np.float32)
    scores = np.asarray(knn.knn_scores(train, labels, test, k=3, temperature=0.07, num_classes=2))
    np.testing.assert_allclose(scores[0], [math.exp(1 / 0.07), 2 * math.exp(0.8 / 0.07)], rtol=1e-5)
    assert knn.knn_classify(train, labels, test, np.array([0]), k=3)["top1"] == 100.0  # e^14.3 > 2 e^11.4
    assert knn.knn_classify(train, labels, test, np.array([1]), k=3, temperature=1.0)["top1"] == 100.0


def test_sharded_knn_on_8_devices_equals_one_device():
    """Training features sharded over 8 devices, each device ranking its own rows and only
    the k best candidates crossing the mesh, vote as the one-device kNN on the whole set."""
    from vicregl_jax import sharding

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(6, 32))  # overlapping classes: some votes go wrong
    y, yt = np.repeat(np.arange(6), 40), np.repeat(np.arange(6), 12)
    x = (centres[y] + 1.5 * rng.normal(size=(len(y), 32))).astype(np.float32)
    xt = (centres[yt] + 1.5 * rng.normal(size=(len(yt), 32))).astype(np.float32)
    want = knn.knn_classify(x, y, xt, yt, k=20, temperature=0.07, num_classes=6)
    assert 0 < want["top1"] < 100  # neither trivial nor hopeless: a wrong vote would show
    for devices in (8, 1):
        mesh = sharding.make_mesh(devices)
        batch = 48  # 240 training rows: 5 batches, the last padded with label -1

        def iterate(features, labels):
            for start in range(0, len(labels), batch):
                f, lab = features[start : start + batch], labels[start : start + batch]
                pad = batch - len(lab)
                yield {
                    "image": np.pad(f, ((0, pad), (0, 0))),
                    "label": np.pad(lab, (0, pad), constant_values=-1),
                    "mask": np.arange(batch) < len(lab),
                }

        identity = lambda images: (None, images)  # noqa: E731
        train = knn.sharded_features(identity, iterate(x, y), mesh)
        test = knn.sharded_features(identity, iterate(xt, yt), mesh)
        assert train.count == len(y) and len(train.features.sharding.device_set) == devices
        hits = knn.make_sharded_hits(mesh, k=20, temperature=0.07, num_classes=6)
        counts = np.sum(
            [
                np.asarray(hits(train.features, train.labels, test.features[t], test.labels[t]))
                for t in range(test.features.shape[0])
            ],
            axis=0,
        )
        np.testing.assert_allclose(100.0 * counts / len(yt), [want["top1"], want["top5"]])


def test_knn_over_two_processes_keeps_features_off_the_hosts(tmp_path):
    """2 processes x 4 devices give the hits of 1 process x 8, and no host allocates more than a
    quarter of the training features (32 MiB here; all-gathering them, as before, cost every
    host all of them): they stay sharded on the devices."""
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "knn_worker.py")

    def run(devices, processes):
        port = free_port()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    worker,
                    "--devices",
                    str(devices),
                    "--process_id",
                    str(i),
                    "--num_processes",
                    str(processes),
                    "--port",
                    str(port),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=worker_env(),
            )
            for i in range(processes)
        ]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs[0][-2000:]
        return [json.loads(out.split("RESULT", 1)[1]) for out in outs]

    (one,) = run(8, 1)
    two = run(4, 2)
    assert one["count"] == 512 and 0 < one["hits"][0] < 512
    for result in two:
        assert result["hits"] == one["hits"]
        assert result["host_peak_bytes"] < 0.25 * result["train_feature_bytes"], result
    assert one["host_peak_bytes"] < 0.25 * one["train_feature_bytes"], one


def test_linear_head_separable_is_perfect():
    x, y = separable(1)
    xv, yv = separable(1, n_per_class=6)
    batches = lambda epoch: iter([(x, y, np.ones(len(y), bool))])  # noqa: E731
    val = lambda: iter([(xv, yv, np.ones(len(yv), bool))])  # noqa: E731
    out = linear.train_linear_head(batches, val, dim=16, num_classes=5, steps_per_epoch=1, epochs=20, lr=0.1)
    assert out["top1"] == 100.0 and out["best_top1"] == 100.0


def test_linear_head_steps_match_torch_sgd():
    """Our SGD (decay on weight and bias, momentum, per-epoch cosine lr) against torch.optim.SGD."""
    torch = pytest.importorskip("torch")
    x, y = separable(2, n_per_class=4, classes=3, dim=6)
    epochs, lr, wd = 3, 0.3, 1e-2
    start = linear.linear_head(6, 3, seed=0)  # train_linear_head starts from the same head
    head = torch.nn.Linear(6, 3).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor(np.asarray(start.kernel[...]).T))
        head.bias.copy_(torch.tensor(np.asarray(start.bias[...])))
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    halves = [slice(0, 6), slice(6, 12)]
    for _ in range(epochs):
        for s in halves:
            loss = torch.nn.functional.cross_entropy(head(torch.tensor(x[s], dtype=torch.float64)), torch.tensor(y[s]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    out = linear.train_linear_head(
        lambda epoch: iter([(x[s], y[s], np.ones(6, bool)) for s in halves]),
        lambda: iter([(x, y, np.ones(12, bool))]),
        dim=6,
        num_classes=3,
        steps_per_epoch=2,
        epochs=epochs,
        lr=lr,
        weight_decay=wd,
    )
    np.testing.assert_allclose(
        np.asarray(out["head"].kernel[...]), head.weight.detach().numpy().T, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(out["head"].bias[...]), head.bias.detach().numpy(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Correspondence
# ------------------------------------------------------------------------------------------


def grid(top, left, height, width, n, flip=False):
    from vicregl_jax.data import location_grid

    return np.asarray(location_grid(top, left, height, width, n, flip), np.float32)


def test_identical_views_give_correspondence_one():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(3, 16, 8)).astype(np.float32)
    grids = np.stack([grid(10, 20, 100, 120, 4)] * 3)
    correct, valid, chance = correspond.correspondence_counts(feats, feats, grids, grids)
    assert int(correct) == int(valid) == 48
    # Chance by hand on a 4 x 4 grid: corner cells see 4 cells within one, edge 6, inner 9.
    assert float(chance) == pytest.approx(3 * (4 * 4 + 8 * 6 + 4 * 9) / 16)


def test_flipped_view_with_corrected_grid_is_found():
    """View B shows the same crop flipped; its features are A's with columns reversed."""
    rng = np.random.default_rng(5)
    n = 4
    fa = rng.normal(size=(1, n, n, 8)).astype(np.float32)
    fb = fa[:, :, ::-1]
    ga, gb = grid(0, 0, 64, 64, n), grid(0, 0, 64, 64, n, flip=True)
    c, v, _ = correspond.correspondence_counts(fa.reshape(1, -1, 8), fb.reshape(1, -1, 8), ga[None], gb[None])
    assert int(c) == int(v) == 16
    # With the uncorrected grid the same features look wrong at the sides.
    c_bad, _, _ = correspond.correspondence_counts(fa.reshape(1, -1, 8), fb.reshape(1, -1, 8), ga[None], ga[None])
    assert int(c_bad) < 16


def test_cells_outside_the_other_view_are_not_counted():
    ga = grid(0, 0, 80, 80, 4)  # cells of 20 px; B covers the right half only
    gb = grid(0, 40, 80, 40, 2)
    cells, inside = correspond.true_cells(jnp.asarray(ga.reshape(-1, 2)), jnp.asarray(gb))
    assert np.asarray(inside).reshape(4, 4)[:, :2].sum() == 0 and np.asarray(inside).reshape(4, 4)[:, 2:].all()
    np.testing.assert_array_equal(np.asarray(cells).reshape(4, 4, 2)[1, 3], [0, 1])


# ------------------------------------------------------------------------------------------
# Runners and the demo, end to end on the embedded data
# ------------------------------------------------------------------------------------------


def demo_config(data_dir, overrides=None):
    from vicregl_jax.config_files import config_module

    c = config_module(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")).get_config()
    c.data.data_dir = data_dir
    # A handful of steps of the smallest graph: this tests the files, not the quality.
    c.total_steps = 3
    c.data.crops = ((64, 2, 0.3, 1.0),)
    c.loss.num_matches = (3, 2)
    c.model.mlp, c.model.maps_mlp = "64-64", "32-32"
    c.eval.correspond.crop_size = 64
    c.eval.linear.epochs = 2
    # Slices of the digits and small batches: every evaluation runs its whole path on a few
    # batches (a batch is computed whole, padding included: 512 made 512 correspondence pairs).
    c.eval.train_split, c.eval.split = "train[:256]", "test[:96]"
    c.eval.correspond.pairs = 16
    c.eval.batch_size = 32
    c.checkpoint.every_steps = 100
    c.update_from_flattened_dict(dict(overrides or {}))
    return c


@pytest.fixture(scope="module")
def demo_run(data_dir, tmp_path_factory):
    from vicregl_jax import demo

    workdir = tmp_path_factory.mktemp("demo")
    summary = demo.run_demo(demo_config(data_dir), str(workdir))
    return workdir, summary


def test_demo_produces_every_file(demo_run):
    workdir, summary = demo_run
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "summary.md",
        "pca.png",
        "correspondences_trained.png",
        "correspondences_random.png",
        "export/resnet_test_backbone.pth",
        "export/resnet_test_full.pth",
    ):
        assert (workdir / name).exists(), name
    for mode in ("knn", "linear", "correspond"):
        for label in ("trained", "random"):
            results = json.loads((workdir / f"eval_{mode}_{label}.json").read_text())
            assert results["weights"], (mode, label)
    assert set(summary["trained_beats_random"]) == {"knn_top1", "linear_top1", "correspond"}
    assert Image.open(workdir / "pca.png").size[0] == 448
    assert "| kNN top-1 (%), digits |" in (workdir / "summary.md").read_text()


def test_exported_pytorch_weights_evaluate_like_the_workdir(demo_run, data_dir):
    """An evaluation accepts the release's PyTorch layout: the exported .pth gives the same
    features as the checkpoint it came from."""
    workdir, _ = demo_run
    config = demo_config(data_dir)
    from_ckpt = common.load_backbone(config, str(workdir)).backbone
    from_pth, description, _ = common.load_backbone(config, None, str(workdir / "export/resnet_test_backbone.pth"))
    assert "PyTorch file" in description
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    np.testing.assert_allclose(np.asarray(from_pth(images)[1]), np.asarray(from_ckpt(images)[1]), rtol=1e-5, atol=1e-5)
