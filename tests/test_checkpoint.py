"""checkpoint.py: checksums find flipped bytes, a damaged newest checkpoint is skipped for
resuming, evaluation and initial weights, and none intact is an error listing each. The tiny
trained workdir (checkpoints at steps 1, 2, 3) is conftest's `trained`, copied per test."""

import glob
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny import copy_of, steps_on_disk, tiny_config

from vicregl_jax import release, train
from vicregl_jax import workdir as workdir_lib
from vicregl_jax.checkpoint import DAMAGED_DIR, Checkpointer, CheckpointError
from vicregl_jax.model_config import model_meta
from vicregl_jax.safe_io import DiskFullError

STEPS = {"checkpoint.every_steps": 1}  # a checkpoint at every step


def flip_silently(workdir, step):
    """Flips one byte of the train item's largest data file at step where Orbax itself still
    restores it (without error, into other values); returns the file."""
    folder = workdir / "checkpoints" / str(step)
    path = max(glob.glob(str(folder / "train" / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
    with open(path, "rb") as f:
        original = f.read()
    config = workdir_lib.load_config(workdir)
    manager = Checkpointer(workdir, model_meta(config), read_only=True).manager
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), manager.item_metadata(step)["train"]
    )

    def restored():
        return jax.tree.leaves(
            manager.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(target)))["train"]
        )

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
    assert os.listdir(workdir / DAMAGED_DIR) == ["3"]
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
    _, _, step = release.load_workdir_model(workdir)
    assert step == good
    assert f"using the checkpoint of step {good}; skipped step {bad} ({why}" in capsys.readouterr().out
    # So do initial weights.
    config = tiny_config(data_dir, {"model.init_weights": str(workdir)})
    _, _, description = release.initial_weights(str(workdir), config, like.params, like.batch_stats)
    assert description.startswith(f"{workdir} (step {good}; skipped step {bad} ({why}")
    # Resuming moves the damaged one aside, so that it neither blocks a save nor counts as kept.
    checkpointer = Checkpointer(workdir, model_meta(config))
    step, state, skipped = checkpointer.restore(like)
    checkpointer.close()
    assert step == good == int(state.step) and [s for s, _ in skipped] == [bad] and why in skipped[0][1]
    assert steps_on_disk(workdir) == list(range(1, good + 1))
    assert os.listdir(workdir / DAMAGED_DIR) == [str(bad)]


def test_an_empty_step_folder_is_not_the_step_of_the_workdir(data_dir, trained, tmp_path, caplog):
    from vicregl_jax import build

    workdir = copy_of(trained, tmp_path)
    os.makedirs(workdir / "checkpoints" / "25")  # newer than total_steps=20: not a checkpoint, skipped
    os.makedirs(workdir / "checkpoints" / "24" / "model")  # partial: no meta item
    checkpointer = Checkpointer(workdir, model_meta(workdir_lib.load_config(workdir)), read_only=True)
    assert checkpointer.latest_step() == 3
    checkpointer.close()
    assert "checkpoints/25: not a checkpoint (an empty folder)" in caplog.text
    assert "checkpoints/24: not a checkpoint (no 'meta' item)" in caplog.text
    build.resume_changes(tiny_config(data_dir, {**STEPS, "total_steps": 20, "allow_config_change": True}), workdir, 3)


def test_no_intact_checkpoint_is_an_error_listing_each(trained, tmp_path, like):
    workdir = copy_of(trained, tmp_path)
    for step in (1, 2, 3):
        shutil.rmtree(workdir / "checkpoints" / str(step) / "train")
    os.makedirs(workdir / "checkpoints" / "4" / "train")
    checkpointer = Checkpointer(workdir, model_meta(workdir_lib.load_config(workdir)))
    with pytest.raises(
        CheckpointError,
        match=r"restores and verifies \(step 4: its 'meta' item is missing; "
        r"step 3: its 'train' item is missing;.*step 1.*Nothing was changed",
    ):
        checkpointer.restore(like)
    checkpointer.close()
    assert steps_on_disk(workdir) == [1, 2, 3, 4]


def test_a_full_disk_during_a_save_is_one_error(data_dir, trained, tmp_path, caplog):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): tests/test_workdir.py injects ENOSPC instead")
    try:
        workdir = small / "run"
        shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("events.*"))
        shutil.rmtree(workdir / "checkpoints" / "1")
        free = shutil.disk_usage(small).free
        (small / "ballast").write_bytes(b"\0" * (free - 200 * 2**10))  # 200 KiB left: less than a checkpoint
        config = tiny_config(data_dir, STEPS)
        with pytest.raises(
            DiskFullError, match=r"run: no space left on its disk \(a checkpoint needs about \d+.\d MiB"
        ):
            train.train_and_evaluate(config, workdir, stop_after_steps=1)
        # Not one traceback per array of the unawaited writes Orbax leaves behind.
        assert not [r for r in caplog.records if r.name == "asyncio" or r.exc_info], caplog.text[-3000:]
        assert steps_on_disk(workdir) == [2, 3]  # the half-written step 4 is Orbax's temporary folder
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
