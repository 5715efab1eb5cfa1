"""What a week-long run meets: diverged updates, damaged or corrupted checkpoints, a locked or
unusable workdir, a changed config on resume, nonsense values, and the one-line errors of
main.py. One tiny trained workdir (checkpoints at steps 1, 2, 3) is shared, copied per test."""

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import read_state, worker_env
from tiny import tiny_config

from vicregl_jax import build, sharding, train
from vicregl_jax import config as config_lib
from vicregl_jax import state as state_lib
from vicregl_jax import workdir as workdir_lib
from vicregl_jax.evaluate import linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {"checkpoint.every_steps": 1}  # a checkpoint at every step


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A workdir of the tiny config after 3 steps, with checkpoints 1, 2 and 3 (copy before use)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.train_and_evaluate(tiny_config(data_dir, STEPS), workdir, stop_after_steps=3)
    return workdir


def copy_of(trained, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(trained, target)
    return target


def steps_on_disk(workdir):
    return sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())


def all_finite(tree):
    return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.floating))


@pytest.fixture(scope="module")
def like(data_dir):
    """A fresh train state of the tiny config on 8 devices: the layout restores target."""
    config = tiny_config(data_dir)
    _, tx = build.make_optimizer(config, 10, config.total_steps)
    return build.init_train_state(config, tx, sharding.make_mesh(8))[2]


# ------------------------------------------------------------------------------------------
# 1. A diverged update is neither applied nor saved
# ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e41 as float32: the point
def test_update_to_nan_with_a_finite_loss_is_not_kept(data_dir, trained, tmp_path):
    """lr 1e41 overflows float32: the loss of step 4 is finite, the updated parameters are not.
    The run stops at step 4 and every checkpoint it keeps is finite."""
    workdir = copy_of(trained, tmp_path)
    config = tiny_config(data_dir, {**STEPS, "optim.base_lr": 1e41, "allow_config_change": True})
    with pytest.raises(train.NonFiniteLossError,
                       match=r"update gave NaN or Inf parameters.*\(loss [0-9.]+\) at step 4: stopping.*"
                             r"last good checkpoint is step 3"):
        train.train_and_evaluate(config, workdir, stop_after_steps=2)
    assert steps_on_disk(workdir) == [1, 2, 3]
    for step in (1, 2, 3):
        assert all_finite(read_state(workdir, step)[1]), step


# ------------------------------------------------------------------------------------------
# 2. Checksums: flipped bytes are found, the run resumes before them, rotation keeps that one
# ------------------------------------------------------------------------------------------


def flip_silently(workdir, step):
    """Flips one byte of the train item's largest data file at step where Orbax itself still
    restores it (without error, into other values); returns the file."""
    folder = workdir / "checkpoints" / str(step)
    path = max(glob.glob(str(folder / "train" / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
    with open(path, "rb") as f:
        original = f.read()
    config = state_lib.load_config(workdir)
    manager = state_lib.Checkpointer(workdir, state_lib.model_meta(config), read_only=True).manager
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step)["train"])

    def restored():
        return jax.tree.leaves(manager.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(target)))["train"])

    before = restored()
    for fraction in (0.5, 0.6, 0.7, 0.8, 0.4, 0.3):
        data = bytearray(original)
        data[int(len(data) * fraction)] ^= 0x5A
        with open(path, "wb") as f:
            f.write(bytes(data))
        try:
            after = restored()
        except Exception:  # noqa: BLE001, S112 (a flip the decoder notices: not the silent kind)
            continue
        if any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after)):
            manager.close()
            return path
    raise AssertionError("no silent flip found")


# A flip that Orbax's decoder notices leaves its read coroutines unawaited (flip_silently tries another).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bytes_are_detected_and_the_run_resumes_before_them(data_dir, trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    flip_silently(workdir, 3)
    config = tiny_config(data_dir, {**STEPS, "checkpoint.keep": 2})
    result = train.train_and_evaluate(config, workdir, stop_after_steps=3)
    out = capsys.readouterr().out
    assert "at step 2 of 1000 (skipped step 3 (the data of train/opt_state/" in out
    assert "does not match its checksum" in out
    assert result.step == 5
    # keep=2 keeps 4 and 5, and rotation kept 2 too: the checkpoint this run verified.
    assert steps_on_disk(workdir) == [2, 4, 5]
    assert os.listdir(workdir / state_lib.DAMAGED_DIR) == ["3"]
    # 12. The replayed step 3 was logged once: one row per step.
    rows = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------
# 3. Damaged checkpoints are skipped, for resuming, evaluation and initial weights
# ------------------------------------------------------------------------------------------


def damage(workdir, form):
    step3 = workdir / "checkpoints" / "3"
    if form == "truncated data file":
        path = max(glob.glob(str(step3 / "model" / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        return 3, "its 'model' item does not read"
    if form == "deleted _METADATA":
        os.remove(step3 / "model" / "_METADATA")
        return 3, "its 'model' item does not read"
    if form == "missing item":
        shutil.rmtree(step3 / "model")
        return 3, "its 'model' item is missing"
    os.makedirs(workdir / "checkpoints" / "4")  # an empty step folder, newer than the rest
    return 4, "the step folder is empty"


@pytest.mark.parametrize("form", ["truncated data file", "deleted _METADATA", "missing item", "empty step folder"])
def test_damaged_newest_checkpoint_falls_back(data_dir, trained, tmp_path, like, form, capsys):
    workdir = copy_of(trained, tmp_path)
    bad, why = damage(workdir, form)
    good = 2 if bad == 3 else 3
    # Evaluation and export read the newest checkpoint that restores and verifies.
    _, _, step = state_lib.load_workdir_model(workdir)
    assert step == good
    assert f"using the checkpoint of step {good}; skipped step {bad} ({why}" in capsys.readouterr().out
    # So do initial weights.
    config = tiny_config(data_dir, {"model.init_weights": str(workdir)})
    _, _, description = state_lib.initial_weights(str(workdir), config, like.params, like.batch_stats)
    assert description.startswith(f"{workdir} (step {good}; skipped step {bad} ({why}")
    # Resuming moves the damaged one aside, so that it neither blocks a save nor counts as kept.
    checkpointer = state_lib.Checkpointer(workdir, state_lib.model_meta(config))
    step, state, skipped = checkpointer.restore(like)
    checkpointer.close()
    assert step == good == int(state.step) and [s for s, _ in skipped] == [bad] and why in skipped[0][1]
    assert steps_on_disk(workdir) == list(range(1, good + 1))
    assert os.listdir(workdir / state_lib.DAMAGED_DIR) == [str(bad)]


def test_no_intact_checkpoint_is_an_error_listing_each(trained, tmp_path, like):
    workdir = copy_of(trained, tmp_path)
    for step in (1, 2, 3):
        shutil.rmtree(workdir / "checkpoints" / str(step) / "train")
    os.makedirs(workdir / "checkpoints" / "4" / "train")
    checkpointer = state_lib.Checkpointer(workdir, state_lib.model_meta(state_lib.load_config(workdir)))
    with pytest.raises(state_lib.CheckpointError, match=r"restores and verifies \(step 4: its 'meta' item is missing; "
                       r"step 3: its 'train' item is missing;.*step 1.*Nothing was changed"):
        checkpointer.restore(like)
    checkpointer.close()
    assert steps_on_disk(workdir) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------
# 6. The classifier's classes against the data's
# ------------------------------------------------------------------------------------------


def test_more_classes_in_the_data_than_the_classifier_is_an_error(data_dir, tmp_path):
    config = tiny_config(data_dir, {"data.dataset": "vicregl_digits", "model.num_classes": 4})
    with pytest.raises(ValueError, match=r"config.model.num_classes=4 but the dataset 'vicregl_digits' has 10 classes "
                                         r"\(labels 0..9\): set --config.model.num_classes=10"):
        train.train_and_evaluate(config, tmp_path / "run", stop_after_steps=1)
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


# ------------------------------------------------------------------------------------------
# 7. One run per workdir
# ------------------------------------------------------------------------------------------


def write_lock(workdir, **fields):
    os.makedirs(workdir, exist_ok=True)
    info = {"host": socket.gethostname(), "boot_id": workdir_lib._boot_id(), "pid": os.getpid(), "token": "other",
            "started": time.time(), "beat": 0, "heartbeat": time.time(), **fields}
    (workdir / workdir_lib.LOCK_NAME).write_text(json.dumps(info))
    return info


def test_workdir_lock(data_dir, tmp_path, monkeypatch, caplog):
    # A live run on this host holds it: refused at once, naming the holder.
    write_lock(tmp_path / "live")
    with pytest.raises(workdir_lib.WorkdirLockedError, match=rf"live is in use by another run \(host "
                       rf"{socket.gethostname()}, pid {os.getpid()} .*delete .*run.lock"):
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


# ------------------------------------------------------------------------------------------
# 8. Resuming under another config
# ------------------------------------------------------------------------------------------


def test_resume_with_a_changed_config_is_refused_unless_allowed(data_dir, trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    with pytest.raises(ValueError, match=r"at step 3 with another config \(batch_size: 16 -> 32, "
                                         r"optim.base_lr: 0.5 -> 0.3\).*--config.allow_config_change=True"):
        build.build_run(tiny_config(data_dir, {**STEPS, "batch_size": 32, "optim.base_lr": 0.3}), workdir)
    with pytest.raises(ValueError, match=r"config.total_steps=2 is below the step .* is at \(3\)"):
        build.build_run(tiny_config(data_dir, {**STEPS, "total_steps": 2, "allow_config_change": True}), workdir)
    # Free to change: logging, checkpoint cadence, devices, data location, evaluations.
    free = {"log_every_steps": 5, "checkpoint.keep": 2, "mesh.num_devices": 4, "data.data_dir": "elsewhere",
            "eval.linear.epochs": 3, "model.init_weights": "x.pth", "compilation_cache_dir": "off"}
    assert config_lib.resume_changes(state_lib.load_config(workdir), tiny_config(data_dir, {**STEPS, **free})) == []
    changed = tiny_config(data_dir, {**STEPS, "data.flip_grid": True, "allow_config_change": True})
    run = build.build_run(changed, workdir)
    run.iterator.close(), run.checkpointer.close()
    assert "Config changed on resume at step 3: data.flip_grid: False -> True" in capsys.readouterr().out
    assert json.loads((workdir / "config.3.json").read_text())["data"]["flip_grid"] is True
    assert json.loads((workdir / "config.json").read_text())["data"]["flip_grid"] is False
    assert state_lib.load_config(workdir).data.flip_grid is True
    build.check_resume(tiny_config(data_dir, {**STEPS, "data.flip_grid": True}), workdir, 3)  # the new one now


# ------------------------------------------------------------------------------------------
# 9. Nonsense values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,pattern", [
    ({"total_steps": 0}, r"config.total_steps=0: must be 1 or more; leave it unset"),
    ({"total_steps": -5}, r"config.total_steps=-5: must be 1 or more"),
    ({"optim.base_lr": -0.1}, r"config.optim.base_lr=-0.1: must be 0 or more"),
    ({"optim.weight_decay": -1e-6}, r"config.optim.weight_decay=-1e-06: must be 0 or more"),
    ({"total_steps": None, "epochs": 0}, r"config.epochs=0: must be above 0"),
    ({"optim.warmup_epochs": -1}, r"config.optim.warmup_epochs=-1: must be 0 or more"),
    ({"loss.var_coeff": -25.0}, r"config.loss.var_coeff=-25.0: must be 0 or more"),
    ({"mesh.num_devices": -1}, r"config.mesh.num_devices=-1: must be 1 or more"),
    ({"optim.base_lr": float("nan")}, r"config.optim.base_lr=nan: must be 0 or more"),
])
def test_nonsense_values_are_errors(data_dir, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        build.check_config(tiny_config(data_dir, overrides), num_devices=8)


def test_linear_evaluation_on_unlabelled_data_is_an_error(data_dir, trained):
    config = tiny_config(data_dir, {"eval.dataset": "vicregl_photos", "eval.split": "train",
                                    "eval.linear.mode": "fast", "eval.linear.epochs": 1})
    with pytest.raises(ValueError, match=r"Linear evaluation needs labels, and the dataset 'vicregl_photos' \(train\) "
                                         r"has none: set --config.eval.dataset"):
        linear.run(config, str(trained))


# ------------------------------------------------------------------------------------------
# 10. main.py: one line and a non-zero status for every error of ours
# ------------------------------------------------------------------------------------------


def test_workdir_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file is a file, not a folder"):
        workdir_lib.check_workdir(tmp_path / "file" / "run")
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real(path, mode))
    with pytest.raises(ValueError, match=r"run would be created in .*, which is not writable"):
        workdir_lib.check_workdir(tmp_path / "run")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_main_prints_one_line_for_our_errors(tmp_path):
    (tmp_path / "file").write_text("")
    empty_data = tmp_path / "tfds"
    empty_data.mkdir()
    holder = workdir_lib.WorkdirLock(tmp_path / "locked").acquire()  # a live run of this process
    base = [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/demo.py", "--config.mode=pretrain",
            f"--config.data.data_dir={empty_data}"]
    cases = {
        "file": ([f"--workdir={tmp_path / 'file'}"], r"--workdir=.*file: .*file is a file, not a folder"),
        "init": ([f"--workdir={tmp_path / 'a'}", f"--config.model.init_weights={tmp_path / 'missing.pth'}"],
                 r"config.model.init_weights='.*missing.pth' does not exist"),
        "locked": ([f"--workdir={tmp_path / 'locked'}"], rf"locked is in use by another run \(host .*, pid {os.getpid()}"),
        "verbose": ([f"--workdir={tmp_path / 'b'}", "--config.total_steps=0", "--verbosity=1"],
                    r"ValueError: config.total_steps=0: must be 1 or more"),
    }
    procs = {name: subprocess.Popen(base + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                    env=worker_env()) for name, (args, _) in cases.items()}
    try:
        errors = {name: proc.communicate(timeout=240)[1] for name, proc in procs.items()}
    finally:
        holder.release()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, proc in procs.items():
        err = errors[name]
        assert proc.returncode == 1, (name, err[-3000:])
        assert re.search(cases[name][1], err), (name, err[-3000:])
        if name == "verbose":
            assert "Traceback" in err
        else:
            assert "Traceback" not in err, (name, err[-3000:])
            assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err
    # Nothing was written before the checks of the workdir and the values, and no data was set
    # up before the init_weights check.
    assert (tmp_path / "file").read_text() == "" and not (tmp_path / "b").exists()
    assert os.listdir(empty_data) == []


# ------------------------------------------------------------------------------------------
# 11. The release's training checkpoints as initial weights; 12. one metrics row per step
# ------------------------------------------------------------------------------------------


def test_release_training_checkpoint_as_initial_weights(data_dir, trained, tmp_path, like):
    """A checkpoint of the release's training script (its LARS state pickles a function
    reference) is read as init_weights and as --weights; a __reduce__ payload runs nothing."""
    import torch
    from test_convert import RunsShell, exclude_bias_and_norm

    from vicregl_jax import layout

    model, _, _ = state_lib.load_workdir_model(trained)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in layout.to_torch_state_dict(model, "resnet_test").items()}
    lars = {"param_groups": [{"params": [0], "lars_adaptation_filter": exclude_bias_and_norm}], "state": {}}
    torch.save({"epoch": 1, "model": tensors, "optimizer": lars}, tmp_path / "lars.pth")
    config = tiny_config(data_dir, {"model.init_weights": str(tmp_path / "lars.pth")})
    params, _, description = state_lib.initial_weights(str(tmp_path / "lars.pth"), config, like.params, like.batch_stats)
    assert "backbone" in description
    np.testing.assert_array_equal(np.asarray(params["backbone"]["conv1"]["kernel"][...]),
                                  np.asarray(model.backbone.conv1.kernel[...]))
    backbone = state_lib.load_release_backbone(tmp_path / "lars.pth", config)
    np.testing.assert_array_equal(np.asarray(backbone.conv1.kernel[...]), np.asarray(model.backbone.conv1.kernel[...]))
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "model": tensors, "optimizer": RunsShell(f"touch {marker}")}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused"):
        state_lib.initial_weights(str(tmp_path / "evil.pth"), config, like.params, like.batch_stats)
    assert not marker.exists()


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
