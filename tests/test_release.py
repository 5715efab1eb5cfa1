"""release.py: the release's training checkpoints as initial weights and as --weights, and a
pickle payload that would run code refused."""

import numpy as np
import pytest
import torch
from test_convert import RunsShell, exclude_bias_and_norm
from tiny import tiny_config

from vicregl_jax import layout, release


def test_release_training_checkpoint_as_initial_weights(data_dir, trained, tmp_path, like):
    """A checkpoint of the release's training script (its LARS state pickles a function
    reference) is read as init_weights and as --weights; a __reduce__ payload runs nothing."""
    model, _, _ = release.load_workdir_model(trained)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in layout.to_torch_state_dict(model, "resnet_test").items()}
    lars = {"param_groups": [{"params": [0], "lars_adaptation_filter": exclude_bias_and_norm}], "state": {}}
    torch.save({"epoch": 1, "model": tensors, "optimizer": lars}, tmp_path / "lars.pth")
    config = tiny_config(data_dir, {"model.init_weights": str(tmp_path / "lars.pth")})
    params, _, description = release.initial_weights(str(tmp_path / "lars.pth"), config, like.params, like.batch_stats)
    assert "backbone" in description
    np.testing.assert_array_equal(
        np.asarray(params["backbone"]["conv1"]["kernel"][...]), np.asarray(model.backbone.conv1.kernel[...])
    )
    backbone = release.load_release_backbone(tmp_path / "lars.pth", config.model)
    np.testing.assert_array_equal(np.asarray(backbone.conv1.kernel[...]), np.asarray(model.backbone.conv1.kernel[...]))
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "model": tensors, "optimizer": RunsShell(f"touch {marker}")}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused"):
        release.initial_weights(str(tmp_path / "evil.pth"), config, like.params, like.batch_stats)
    assert not marker.exists()
