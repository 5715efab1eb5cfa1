"""config.py's rules, as build.check_config applies them: values no run can use are errors
naming the key and the fix."""

import pytest
from tiny import tiny_config

from vicregl_jax import build


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"total_steps": 0}, r"config.total_steps=0: must be 1 or more; leave it unset"),
        ({"total_steps": -5}, r"config.total_steps=-5: must be 1 or more"),
        ({"optim.base_lr": -0.1}, r"config.optim.base_lr=-0.1: must be 0 or more"),
        ({"optim.weight_decay": -1e-6}, r"config.optim.weight_decay=-1e-06: must be 0 or more"),
        ({"total_steps": None, "epochs": 0}, r"config.epochs=0: must be above 0"),
        ({"optim.warmup_epochs": -1}, r"config.optim.warmup_epochs=-1: must be 0 or more"),
        ({"loss.var_coeff": -25.0}, r"config.loss.var_coeff=-25.0: must be 0 or more"),
        ({"mesh.num_devices": -1}, r"config.mesh.num_devices=-1: must be 1 or more"),
        ({"optim.base_lr": float("nan")}, r"config.optim.base_lr=nan: must be 0 or more"),
    ],
)
def test_nonsense_values_are_errors(data_dir, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        build.check_config(tiny_config(data_dir, overrides), num_devices=8)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"optim.base_lr": 1e41}, r"config.optim.base_lr=1e\+41: the peak learning rate .* overflows float32: give a"),
        ({"optim.base_lr": float("inf")}, r"config.optim.base_lr=inf: must be a finite number"),
        ({"optim.weight_decay": float("inf")}, r"config.optim.weight_decay=inf: must be a finite number"),
        # Finite, but base_lr * batch_size / 256 is not in float32.
        ({"optim.base_lr": 1e38, "batch_size": 4096}, r"config.optim.base_lr=1e\+38: .* from 0 to 2.13e\+37"),
    ],
)
def test_learning_rates_that_overflow_are_refused(data_dir, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        build.check_config(tiny_config(data_dir, overrides), num_devices=8)
