"""Pre-training end to end on 8 virtual devices: learning, sharding, multi-host, resume, signals."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import ROOT, free_port, worker_env
from tiny import copy_of, read_state, steps_on_disk, tiny_config

from vicregl_jax import build, release, sharding, train
from vicregl_jax import data as data_lib
from vicregl_jax.data import global_batch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "train_worker.py")
# The tiny config uses LARS, as the ResNet recipe: equality tests need it (Adam turns a
# rounding difference in a near-zero gradient into a full +-lr step, which says nothing about
# sharding). The learning test uses AdamW, which moves a tiny model faster in a few steps.
ADAMW = {"optim.name": "adamw", "optim.base_lr": 0.1, "optim.weight_decay": 0.05}


def params_of(workdir, step=None):
    return read_state(workdir, step)[1]["model"]["params"]


def max_abs_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def run_worker(workdir, data_dir, overrides, *, devices=8, num_processes=1, stop_after=None, wait=True):
    port = free_port()
    procs = []
    for pid in range(num_processes):
        cmd = [
            sys.executable,
            WORKER,
            str(workdir),
            data_dir,
            "--devices",
            str(devices),
            "--process_id",
            str(pid),
            "--num_processes",
            str(num_processes),
            "--port",
            str(port),
            "--overrides",
            json.dumps(overrides),
        ]
        if stop_after is not None:
            cmd += ["--stop_after", str(stop_after)]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env())
        )
    if not wait:
        return procs
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


# ------------------------------------------------------------------------------------------
# Learning, in process on 8 devices
# ------------------------------------------------------------------------------------------


def test_tiny_run_learns_without_collapse(data_dir, tmp_path):
    config = tiny_config(data_dir, ADAMW)
    result = train.train_and_evaluate(config, tmp_path, stop_after_steps=12)
    assert result.step == 12 and result.stopped_early
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 13))
    loss = [m["loss"] for m in logged]
    variance = [m["global_var"] + m["local_var"] for m in logged]
    assert np.mean(loss[-4:]) < np.mean(loss[:4]) - 1.0, loss
    assert np.mean(variance[-3:]) < np.mean(variance[:3]) - 5.0, variance
    # Collapse would drive the std of the normalised representation to 0; 1/sqrt(64) = 0.125
    # is an isotropic 64-d representation.
    assert min(m["stdr"] for m in logged) > 0.06 and min(m["stde"] for m in logged) > 0.06
    for key in (
        "global_inv",
        "global_var",
        "global_cov",
        "local_inv",
        "local_var",
        "local_cov",
        "cls_loss",
        "top1",
        "top5",
        "stdr",
        "stde",
        "corr",
        "core",
        "learning_rate",
        "images_per_s",
        "step_time_s",
    ):
        assert key in logged[-1], key
    # The config and the checkpoint of the last step sit in the workdir, TensorBoard events beside.
    assert json.loads((tmp_path / "config.json").read_text())["model"]["arch"] == "resnet_test"
    assert read_state(tmp_path)[0] == 12
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


# ------------------------------------------------------------------------------------------
# Sharded equals unsharded; gradient accumulation
# ------------------------------------------------------------------------------------------


def jitted_step(config, mesh):
    """Returns (the jitted train step, the initial state) of config on mesh."""
    schedule, tx = build.make_optimizer(config, steps_per_epoch=10, total_steps=config.total_steps)
    graphdef, streams, state, shardings = build.init_train_state(config, tx, mesh)
    step = train.jit_train_step(
        train.make_train_step(
            graphdef,
            streams,
            tx,
            schedule,
            build.loss_config(config),
            seed=config.seed,
            grad_accum_steps=config.grad_accum_steps,
        ),
        shardings,
        mesh,
    )
    return step, state


def run_steps(config, num_devices, batches):
    """Returns the state after one train step per batch on a mesh of num_devices devices."""
    mesh = sharding.make_mesh(num_devices)
    step, state = jitted_step(config, mesh)
    for batch in batches:
        state, metrics = step(state, data_lib.to_global_batch(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def three_batches(data_dir):
    it = build.pretrain_iterator(tiny_config(data_dir), start_step=0)
    return [next(it) for _ in range(3)]


def test_sharded_on_8_devices_equals_1_device(data_dir, three_batches):
    config = tiny_config(data_dir)
    state8, metrics8 = run_steps(config, 8, three_batches)
    state1, metrics1 = run_steps(config, 1, three_batches)
    assert max_abs_diff(state8.params, state1.params) < 1e-5
    # BatchNorm running statistics too: they are over the global batch on 8 devices.
    assert max_abs_diff(state8.batch_stats, state1.batch_stats) < 1e-5
    np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
    assert int(state8.step) == 3


def test_gradient_accumulation_over_duplicated_halves(data_dir, three_batches):
    """A batch whose micro-batches are identical halves, accumulated over 2, takes the same
    step as one pass over a half (statistics are per micro-batch)."""
    config = tiny_config(data_dir)
    half = jax.tree.map(lambda x: x[:8], three_batches[0])
    doubled = jax.tree.map(lambda x: np.repeat(x, 2, axis=0), half)  # micro-batch b % 2 == half
    # The learning rate scales with the batch (base_lr * batch / 256): double it for the half.
    state_half, m_half = run_steps(tiny_config(data_dir, {"batch_size": 8, "optim.base_lr": 1.0}), 8, [half])
    config.grad_accum_steps = 2
    state_acc, m_acc = run_steps(config, 8, [doubled])
    assert max_abs_diff(state_half.params, state_acc.params) < 1e-5
    np.testing.assert_allclose(m_half["loss"], m_acc["loss"], rtol=1e-5)


def test_non_finite_loss_keeps_the_state(data_dir, three_batches):
    config = tiny_config(data_dir)
    # Float views without draws skip the device colour chain: NaN pixels reach the model.
    bad = {k: v for k, v in three_batches[0].items() if k != "draws"}
    bad["views"] = tuple(np.full(v.shape, np.nan, np.float32) for v in bad["views"])
    mesh = sharding.make_mesh(8)
    step, state = jitted_step(config, mesh)
    before = jax.device_get(state)
    state, metrics = step(state, data_lib.to_global_batch(bad, mesh))
    assert not bool(metrics["finite"])
    after = jax.device_get(state)
    assert max_abs_diff(before.params, after.params) == 0.0 and int(after.step) == 0


def test_nan_in_the_loop_stops_with_the_step_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    config = tiny_config(data_dir, {"checkpoint.every_steps": 2})
    real = global_batch.to_global_batch
    calls = {"n": 0}

    def poisoned(batch, mesh, data_axis="data"):
        calls["n"] += 1
        if calls["n"] == 4:  # the batch of step 4: NaN brightness factors make NaN views on the device
            draws = tuple(
                {**d, "brightness": np.full_like(d["brightness"], np.nan), "order": np.zeros_like(d["order"])}
                for d in batch["draws"]
            )
            batch = dict(batch, draws=draws)
        return real(batch, mesh, data_axis)

    monkeypatch.setattr(global_batch, "to_global_batch", poisoned)
    with pytest.raises(train.NonFiniteLossError, match=r"at step 4: stopping.*last good checkpoint is step 2"):
        train.train_and_evaluate(config, tmp_path)
    assert read_state(tmp_path)[0] == 2


# ------------------------------------------------------------------------------------------
# Resume, other architectures, multi-host, SIGTERM (in other processes)
# ------------------------------------------------------------------------------------------


def test_killed_and_resumed_equals_uninterrupted(data_dir, tmp_path):
    config = tiny_config(data_dir)
    train.train_and_evaluate(config, tmp_path / "straight", stop_after_steps=5)
    first = train.train_and_evaluate(config, tmp_path / "resumed", stop_after_steps=2)
    assert first.step == 2 and first.stopped_early
    second = train.train_and_evaluate(config, tmp_path / "resumed", stop_after_steps=3)
    assert second.step == 5
    straight, resumed = read_state(tmp_path / "straight"), read_state(tmp_path / "resumed")
    assert straight[0] == resumed[0] == 5
    assert max_abs_diff(straight[1], resumed[1]) == 0.0  # params, statistics, optimiser state, step


def test_checkpoint_of_another_architecture_is_refused(data_dir, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    other = tiny_config(data_dir, {"model.arch": "convnext_test"})
    with pytest.raises(
        ValueError, match=r"another model \(model.arch: saved 'resnet_test', now 'convnext_test'\).*new --workdir"
    ):
        train.train_and_evaluate(other, workdir)


def test_sigterm_saves_the_current_step_and_exits_cleanly(data_dir, tmp_path):
    (proc,) = run_worker(tmp_path, data_dir, {}, wait=False)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(out.split("RESULT", 1)[1])
    assert result["stopped_early"] and 2 <= result["step"] < 1000
    assert read_state(tmp_path)[0] == result["step"]


def test_two_processes_equal_one_and_stop_together_on_one_sigterm(data_dir, tmp_path):
    """2 processes x 4 devices (jax.distributed on 127.0.0.1) train as 1 process x 8 devices;
    a preemption notice to one of them (SIGTERM) stops both at the same step through JAX's
    preemption sync point, each past the checkpoint of that step."""
    # One record per read: with blocks each host shuffles windows of its own, so the order
    # depends on the number of hosts (docs/pipeline.md); with read_block=1 it does not.
    order = {"data.read_block": 1}
    procs = run_worker(tmp_path / "two", data_dir, order, devices=4, num_processes=2, wait=False)
    metrics = tmp_path / "two" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        assert all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[1][-3000:]
    results = [json.loads(out.split("RESULT", 1)[1]) for out in outs]
    assert results[0] == results[1] and results[0]["stopped_early"] and 2 <= results[0]["step"] < 1000
    step = results[0]["step"]
    assert read_state(tmp_path / "two")[0] == step
    train.train_and_evaluate(tiny_config(data_dir, order), tmp_path / "one", stop_after_steps=step)
    assert max_abs_diff(params_of(tmp_path / "two"), params_of(tmp_path / "one")) < 1e-5


def test_a_host_whose_storage_fails_stops_every_host_with_its_error(data_dir, tmp_path):
    """Every read of process 1 times out (faked at the file-read boundary): it stops with the
    pipeline's error after its retries, and process 0, whose next collective then fails,
    stops too and names process 1's error; neither hangs."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(photos / f"{i}.jpg")
    port = free_port()
    overrides = json.dumps({"data.dataset": f"folder:{photos}"})
    logs = [open(tmp_path / f"worker{pid}.log", "w") for pid in range(2)]  # files: the retry warnings
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                str(tmp_path / "run"),
                data_dir,
                "--devices",
                "4",  # fill pipes
                "--process_id",
                str(pid),
                "--num_processes",
                "2",
                "--port",
                str(port),
                "--overrides",
                overrides,
            ]
            + (["--fail_reads"] if pid == 1 else []),
            stdout=logs[pid],
            stderr=subprocess.STDOUT,
            text=True,
            env=worker_env(),
        )
        for pid in range(2)
    ]
    for p in procs:
        p.wait(timeout=480)  # a hang would end in TimeoutExpired
    outs = [(tmp_path / f"worker{pid}.log").read_text() for pid in range(2)]
    assert all(p.returncode != 0 for p in procs), [o[-2000:] for o in outs]
    assert "PipelineError" in outs[1] and "unreadable" in outs[1]
    assert "process 1 stopped the run: PipelineError" in outs[0], outs[0][-3000:]


# ------------------------------------------------------------------------------------------
# Config validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"batch_size": 12}, r"config.batch_size=12: must be divisible by the number of devices \(8\).*multiple of 8"),
        (
            {"data.crops": ((60, 2, 0.3, 1.0),)},
            r"config.data.crops=.*crop size 60 does not give a whole grid.*multiple of 32, e.g. 64",
        ),
        ({"loss.num_matches": (5, 1)}, r"config.loss.num_matches=\(5, 1\).*at most \(4, 4\)"),
        ({"loss.alpha": 1.5}, r"alpha=1.5 is outside \[0, 1\]"),
        ({"model.arch": "resnet51"}, r"config.model.arch='resnet51': unknown architecture; use one of resnet18"),
        ({"optim.name": "sgd"}, r"config.optim.name='sgd'"),
        ({"data.crops": ((64, 1, 0.3, 1.0),)}, r"first group needs at least 2 views"),
        ({"data.crops": ((64, 2, 0.0, 1.0),)}, r"CropGroup scale=\(0.0, 1.0\)"),
        ({"model.mlp": "64-x"}, r"MLP spec '64-x'"),
        ({"model.dtype": "float16"}, r"config.model.dtype='float16'"),
        ({"data.jpeg_dct_method": "FAST"}, r"config.data.jpeg_dct_method='FAST': use one of"),
        ({"data.max_failure_share": 5.0}, r"config.data.max_failure_share=5.0: give a fraction"),
        ({"data.resize": "bilinear"}, r"config.data.resize='bilinear': use one of \('pillow', 'tensorflow'\)"),
        (
            {"data.service": "grpc://h:5050"},
            r"config.data.resize='pillow' with config.data.service=.*--config.data.resize=tensorflow",
        ),
        (
            {"grad_accum_steps": 4},
            r"config.batch_size=16: must be divisible by the number of devices \(8\) times grad_accum_steps \(4\)",
        ),
    ],
)
def test_bad_configs_are_named(data_dir, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        build.check_config(tiny_config(data_dir, overrides), num_devices=8)


def test_config_files_are_valid():
    """Every recipe of configs/ loads, with its variants, and validates for a matching mesh;
    old flat keys and misspelt keys on the command line are named with the fix."""
    from vicregl_jax import config as config_lib
    from vicregl_jax import config_files

    root = os.path.join(HERE, "..", "configs")
    for name, variants in (
        ("r50", ("", "alpha=0.9", "schedule=100ep")),
        ("convnext", ("size=s", "size=b,alpha=0.9", "size=xl")),
        ("demo", ("",)),
    ):
        module = config_files.config_module(os.path.join(root, f"{name}.py"))
        assert module.__doc__ and "python main.py --config=configs/" in module.__doc__
        for variant in variants:
            config = module.get_config(variant or None)
            if variant == "size=xl":  # ImageNet-22k is the user's folder: required, named with the fix
                with pytest.raises(ValueError, match=r"config.data.dataset=None.*folder:gs://BUCKET/imagenet22k"):
                    config_lib.validate(config, num_devices=8)
                config.data.dataset = "folder:/data/imagenet22k"
            config_lib.validate(config, num_devices=8 if config.batch_size % 8 == 0 else 1)
    module = config_files.config_module(os.path.join(root, "r50.py"))
    assert module.get_config("alpha=0.9").loss.alpha == 0.9
    assert config_files.load(os.path.join(root, "convnext.py") + ":size=b").model.arch == "convnext_base"
    with pytest.raises(ValueError, match="'alhpa=0.9': write key=value with key one of"):
        module.get_config("alhpa=0.9")
    config = module.get_config()
    with pytest.raises(ValueError, match=r"config.alpha is now config.loss.alpha: write --config.loss.alpha="):
        config_files.check_override_names(["--config.alpha=0.9"], config)
    with pytest.raises(
        ValueError, match=r"config.optim.base_rl is not a config key: did you mean config.optim.base_lr"
    ):
        config_files.check_override_names(["--config.optim.base_rl=0.1"], config)
    config_files.check_override_names(["--config.optim.base_lr=0.1", "--config.batch_size", "512"], config)


def test_old_flat_key_on_the_command_line_fails_with_the_new_name(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "main.py"),
            "--config=configs/demo.py",
            f"--workdir={tmp_path}",
            "--config.base_lr=0.1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=worker_env(),
    )
    assert out.returncode != 0
    assert "config.base_lr is now config.optim.base_lr" in out.stderr and "Traceback" not in out.stderr


def test_initial_weights_from_a_release_file_and_a_workdir(data_dir, trained, tmp_path):
    """config.model.init_weights loads a PyTorch backbone file (heads keep their initialisation) or
    another workdir's model into the state a run starts from, placed like the state."""
    from flax import nnx

    from vicregl_jax import layout, torch_io

    copy_of(trained, tmp_path, "source")  # trained for 3 steps: its heads differ from a fresh init
    source, _, _ = release.load_workdir_model(tmp_path / "source")
    pth = str(tmp_path / "backbone.pth")
    torch_io.write_torch_weights(layout.to_torch_state_dict(source, "resnet_test"), pth)
    mesh = sharding.make_mesh(8)
    for weights in (pth, str(tmp_path / "source")):
        config = tiny_config(data_dir, {"model.init_weights": weights})
        schedule, tx = build.make_optimizer(config, 10, config.total_steps)
        _, _, state, shardings = build.init_train_state(config, tx, mesh)
        params, _, _ = release.initial_weights(weights, config, state.params, state.batch_stats)
        assert jax.tree.map(lambda a: a.sharding, params) == shardings.params
        loaded = nnx.to_pure_dict(jax.device_get(params))
        want = nnx.to_pure_dict(nnx.state(source, nnx.Param))
        assert max_abs_diff(loaded["backbone"], want["backbone"]) == 0.0
        if weights == pth:  # a backbone file leaves the heads as initialised
            assert max_abs_diff(loaded["expander"], want["expander"]) > 0.0
        else:
            assert max_abs_diff(loaded["expander"], want["expander"]) == 0.0
    bad = tiny_config(data_dir, {"model.init_weights": pth, "model.arch": "convnext_test"})
    schedule, tx = build.make_optimizer(bad, 10, bad.total_steps)
    _, _, state, _ = build.init_train_state(bad, tx, mesh)
    with pytest.raises(ValueError, match="do not match"):
        release.initial_weights(pth, bad, state.params, state.batch_stats)
    with pytest.raises(
        ValueError, match="holds another model.*model.arch: 'resnet_test' there vs 'convnext_test' here"
    ):
        release.initial_weights(str(tmp_path / "source"), bad, state.params, state.batch_stats)


def test_train_step_imports_without_tensorflow():
    """The train step, the models and the criterion run where TensorFlow is not installed
    (CUDA images): only the input pipeline needs it, and says so when used."""
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "import vicregl_jax.train, vicregl_jax.losses, vicregl_jax.data as d\n"
        "d.to_global_batch\n"
        "try:\n    d.make_pretrain_iterator\nexcept ImportError:\n    print('pipeline needs tensorflow')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=worker_env()
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pipeline needs tensorflow"


def test_knn_monitor_during_pretraining_matches_the_knn_evaluation(data_dir, tmp_path):
    """knn_every_epochs logs kNN top-1/5 of the current backbone; they equal `--mode=knn` on
    the checkpoint of the same step. An unlabelled kNN dataset fails before training."""
    from vicregl_jax.evaluate import knn

    knn_keys = {
        "eval.dataset": "vicregl_digits",
        "eval.split": "test",
        "eval.image_size": 64,
        "eval.resize_size": 64,
        "eval.batch_size": 128,
    }
    # 76 photos / batch 16 = 4 steps per epoch: a kNN every 2 steps.
    config = tiny_config(data_dir, {"knn_every_epochs": 0.5, **knn_keys})
    train.train_and_evaluate(config, tmp_path, stop_after_steps=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in monitored] == [2]
    assert 10.0 < monitored[0]["knn_top1"] <= monitored[0]["knn_top5"] <= 100.0  # 10 classes: chance 10%
    standalone = knn.run(config, str(tmp_path))
    assert monitored[0]["knn_top1"] == pytest.approx(standalone["top1"], abs=0.35)  # one image of 299 at most
    assert monitored[0]["knn_top5"] == pytest.approx(standalone["top5"], abs=0.35)
    with pytest.raises(ValueError, match=r"kNN needs labels.*'vicregl_photos'.*eval\.dataset"):
        train.train_and_evaluate(
            tiny_config(data_dir, {"knn_every_epochs": 1.0, "eval.split": "train"}), tmp_path / "unlabelled"
        )


STEPS = {"checkpoint.every_steps": 1}  # a checkpoint at every step


def all_finite(tree):
    return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.floating))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e41 as float32: the point
def test_update_to_nan_with_a_finite_loss_is_not_kept(data_dir, trained, tmp_path):
    """A peak lr of 3e38 (base_lr 5e39, just below what the config check refuses) overflows the
    update: the loss of step 4 is finite, the updated parameters are not. The run stops at step
    4 and every checkpoint it keeps is finite."""
    workdir = copy_of(trained, tmp_path)
    config = tiny_config(data_dir, {**STEPS, "optim.base_lr": 5e39, "allow_config_change": True})
    with pytest.raises(
        train.NonFiniteLossError,
        match=r"update gave NaN or Inf parameters.*\(loss [0-9.]+\) at step 4: stopping.*"
        r"last good checkpoint is step 3",
    ):
        train.train_and_evaluate(config, workdir, stop_after_steps=2)
    assert steps_on_disk(workdir) == [1, 2, 3]
    for step in (1, 2, 3):
        assert all_finite(read_state(workdir, step)[1]), step


# ------------------------------------------------------------------------------------------


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    """Rows written before an interruption for steps past the checkpoint are replayed after
    the resume, and logged once."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    log = train.MetricsLog(tmp_path, start_step=3)
    for step in (4, 5, 6):
        log.write(step, {"loss": 2.0})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]


# ------------------------------------------------------------------------------------------
# Stopping at any moment, a torn metrics line, a refused resume, a full disk
# ------------------------------------------------------------------------------------------


def test_signals_at_start_up_and_in_the_loop_end_resumable(data_dir, trained, tmp_path, monkeypatch):
    from vicregl_jax.checkpoint import Checkpointer

    workdir = copy_of(trained, tmp_path)
    metrics_before = (workdir / "metrics.jsonl").read_text()
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    restore = Checkpointer.restore

    def restore_interrupted(self, *args, **kwargs):  # SIGTERM while restoring
        signal.raise_signal(signal.SIGTERM)
        return restore(self, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "restore", restore_interrupted)
    config = tiny_config(data_dir, {"checkpoint.every_steps": 1})
    result = train.train_and_evaluate(config, workdir)
    assert result.stopped_early and result.step is None and result.exit_code == 75
    assert steps_on_disk(workdir) == [1, 2, 3] and (workdir / "metrics.jsonl").read_text() == metrics_before
    # Ctrl-C in the loop: the step ends, is saved, and the run stops with 130 (no KeyboardInterrupt).
    monkeypatch.setattr(Checkpointer, "restore", restore)
    check = train.check_finite

    def interrupted(*args):
        signal.raise_signal(signal.SIGINT)
        return check(*args)

    monkeypatch.setattr(train, "check_finite", interrupted)
    result = train.train_and_evaluate(tiny_config(data_dir), workdir)
    assert result.stopped_early and result.exit_code == 130 and result.step == 5
    assert steps_on_disk(workdir) == [1, 2, 3, 5]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # put back


def test_sigterm_while_a_step_waits_on_its_input_exits_75_in_bounded_time(data_dir, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    cmd = [sys.executable, WORKER, str(workdir), data_dir, "--hang_after", "1", "--stop_grace", "2", "--exit_code"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env())
    lines = []
    for line in proc.stdout:  # the first step done, the input now blocks
        lines.append(line)
        if "HANGING" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    assert "SIGTERM received 2 s ago and the run has not stopped" in out and "Traceback" not in out
    assert steps_on_disk(workdir) == [1, 2, 3]  # resumes from its newest checkpoint


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 4))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 4, "lo')  # a full disk cut the last write
    log = train.MetricsLog(tmp_path, start_step=3)
    log.write(4, {"loss": 2.0})
    log.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert "metrics.jsonl: dropped 1 damaged line(s) (line 4;" in caplog.text


def test_a_refused_resume_writes_nothing(data_dir, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    before = sorted(os.listdir(workdir)), (workdir / "metrics.jsonl").read_text()
    # Changed and allowed, but 1 epoch of 16 examples is 1 step, below the workdir's 3.
    changed = {"data.num_examples": 16, "total_steps": None, "allow_config_change": True}
    with pytest.raises(ValueError, match=r"config.epochs=1 gives 1 steps, below the step .* is at \(3\)"):
        build.build_run(tiny_config(data_dir, changed), workdir)
    assert (sorted(os.listdir(workdir)), (workdir / "metrics.jsonl").read_text()) == before
    build.check_resume(tiny_config(data_dir), workdir, 3)  # the original command still resumes
