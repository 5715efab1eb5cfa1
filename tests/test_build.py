"""build.py: a run assembled from a config and a workdir: resuming under another config,
the classifier's classes against the data's, the evaluations' labelled data."""

import json
import os

import pytest
from tiny import copy_of, tiny_config

from vicregl_jax import build, train
from vicregl_jax import config as config_lib
from vicregl_jax import workdir as workdir_lib
from vicregl_jax.evaluate import linear

STEPS = {"checkpoint.every_steps": 1}  # a checkpoint at every step


def test_more_classes_in_the_data_than_the_classifier_is_an_error(data_dir, tmp_path):
    config = tiny_config(data_dir, {"data.dataset": "vicregl_digits", "model.num_classes": 4})
    with pytest.raises(
        ValueError,
        match=r"config.model.num_classes=4 but the dataset 'vicregl_digits' has 10 classes "
        r"\(labels 0..9\): set --config.model.num_classes=10",
    ):
        train.train_and_evaluate(config, tmp_path / "run", stop_after_steps=1)
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


def test_resume_with_a_changed_config_is_refused_unless_allowed(data_dir, trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    with pytest.raises(
        ValueError,
        match=r"at step 3 with another config \(batch_size: 16 -> 32, "
        r"optim.base_lr: 0.5 -> 0.3\).*--config.allow_config_change=True",
    ):
        build.build_run(tiny_config(data_dir, {**STEPS, "batch_size": 32, "optim.base_lr": 0.3}), workdir)
    with pytest.raises(ValueError, match=r"config.total_steps=2 is below the step .* is at \(3\)"):
        build.build_run(tiny_config(data_dir, {**STEPS, "total_steps": 2, "allow_config_change": True}), workdir)
    # Free to change: logging, checkpoint cadence, devices, data location, evaluations.
    free = {
        "log_every_steps": 5,
        "checkpoint.keep": 2,
        "mesh.num_devices": 4,
        "data.data_dir": "elsewhere",
        "eval.linear.epochs": 3,
        "model.init_weights": "x.pth",
        "compilation_cache_dir": "off",
    }
    assert config_lib.resume_changes(workdir_lib.load_config(workdir), tiny_config(data_dir, {**STEPS, **free})) == []
    changed = tiny_config(data_dir, {**STEPS, "data.flip_grid": True, "allow_config_change": True})
    run = build.build_run(changed, workdir)
    run.iterator.close(), run.checkpointer.close()
    assert "Config changed on resume at step 3: data.flip_grid: False -> True" in capsys.readouterr().out
    assert json.loads((workdir / "config.3.json").read_text())["data"]["flip_grid"] is True
    assert json.loads((workdir / "config.json").read_text())["data"]["flip_grid"] is False
    assert workdir_lib.load_config(workdir).data.flip_grid is True
    build.check_resume(tiny_config(data_dir, {**STEPS, "data.flip_grid": True}), workdir, 3)  # the new one now


def test_linear_evaluation_on_unlabelled_data_is_an_error(data_dir, trained):
    config = tiny_config(
        data_dir,
        {"eval.dataset": "vicregl_photos", "eval.split": "train", "eval.linear.mode": "fast", "eval.linear.epochs": 1},
    )
    with pytest.raises(
        ValueError,
        match=r"Linear evaluation needs labels, and the dataset 'vicregl_photos' \(train\) "
        r"has none: set --config.eval.dataset",
    ):
        linear.run(config, str(trained))
