"""Configs from files and the command line: a config file's variant argument
(`configs/convnext.py:size=b`), loading `configs/x.py[:arg]` as main.py's --config does, and a
one-line error for a `--config.<key>` the config lacks (with its new name when it is a key of
the flat config of earlier versions, else the closest keys). `--config.<key>=None` sets a key
that is unset by default (total_steps, data.num_examples, ...) back to None.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re

import ml_collections
from absl import flags
from ml_collections import config_flags

from vicregl_jax.config import all_keys, default_config

# Keys of the flat config before it was nested: given on the command line they fail with
# their new name.
RENAMED = {
    "dataset": "data.dataset",
    "train_split": "data.split",
    "data_dir": "data.data_dir",
    "manual_dir": "data.manual_dir",
    "crops": "data.crops",
    "flip_grid": "data.flip_grid",
    "num_train_examples": "data.num_examples",
    "arch": "model.arch",
    "mlp": "model.mlp",
    "maps_mlp": "model.maps_mlp",
    "num_classes": "model.num_classes",
    "drop_path_rate": "model.drop_path_rate",
    "layer_scale_init": "model.layer_scale_init",
    "compute_dtype": "model.dtype",
    "init_weights": "model.init_weights",
    "alpha": "loss.alpha",
    "inv_coeff": "loss.inv_coeff",
    "var_coeff": "loss.var_coeff",
    "cov_coeff": "loss.cov_coeff",
    "num_matches": "loss.num_matches",
    "l2_all_matches": "loss.l2_all_matches",
    "fast_vc_reg": "loss.fast_vc_reg",
    "optimizer": "optim.name",
    "base_lr": "optim.base_lr",
    "end_lr_ratio": "optim.end_lr_ratio",
    "weight_decay": "optim.weight_decay",
    "warmup_epochs": "optim.warmup_epochs",
    "num_devices": "mesh.num_devices",
    "param_sharding": "mesh.param_sharding",
    "sharding_rules": "mesh.rules",
    "checkpoint_every_steps": "checkpoint.every_steps",
    "keep_checkpoints": "checkpoint.keep",
    "eval_dataset": "eval.dataset",
    "eval_train_split": "eval.train_split",
    "eval_split": "eval.split",
    "eval_batch_size": "eval.batch_size",
    "eval_image_size": "eval.image_size",
    "eval_resize_size": "eval.resize_size",
    "knn_k": "eval.knn.k",
    "knn_temperature": "eval.knn.temperature",
    "linear_mode": "eval.linear.mode",
    "linear_epochs": "eval.linear.epochs",
    "linear_lr": "eval.linear.lr",
    "linear_weight_decay": "eval.linear.weight_decay",
    "seg_dataset": "eval.segment.dataset",
    "seg_train_split": "eval.segment.train_split",
    "seg_eval_split": "eval.segment.split",
    "seg_steps": "eval.segment.steps",
    "seg_batch_size": "eval.segment.batch_size",
    "correspond_pairs": "eval.correspond.pairs",
    "correspond_crop_size": "eval.correspond.crop_size",
    "correspond_scale": "eval.correspond.scale",
}


def unknown_key_message(key: str, config: ml_collections.ConfigDict) -> str:
    """Returns the one-line error for `--config.<key>` that the config does not have: its new
    name if it is a key of the flat config of earlier versions, else the closest keys."""
    if key in RENAMED:
        return f"config.{key} is now config.{RENAMED[key]}: write --config.{RENAMED[key]}=..."
    keys = all_keys(config)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    close += [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and k not in close]
    hint = (
        f"did you mean {', '.join('config.' + k for k in close[:3])}?"
        if close
        else "the sections are "
        + ", ".join(sorted(k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)))
    )
    return f"config.{key} is not a config key: {hint}"


NONE_TEXTS = ("None", "none")


def check_override_names(argv, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for the first `--config.<key>=...` in argv that config lacks, or that
    gives None to a key that needs a value."""
    defaults = default_config()
    for arg in argv:
        match = re.match(r"--config\.([\w.]+)(=|$)", arg)
        if match is None:
            continue
        node, key = config, match.group(1)
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(unknown_key_message(key, config))
            node = node[part]
        if arg.partition("=")[2].strip() in NONE_TEXTS and _default(defaults, key) is not None:
            raise ValueError(
                f"config.{key}=None: config.{key} needs a value (its default is {_default(defaults, key)!r}); "
                "only the keys that are unset by default take None."
            )


def _default(defaults: ml_collections.ConfigDict, key: str):
    node = defaults
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None  # a key of a config file's own: its file decides
        node = node[part]
    return node


class _NoneOr(flags.ArgumentParser):
    """A flag parser that reads "None" as None and anything else as its inner parser does."""

    def __init__(self, inner: flags.ArgumentParser):
        self.inner = inner

    def parse(self, argument):
        if isinstance(argument, str) and argument.strip() in NONE_TEXTS:
            return None
        return self.inner.parse(argument)

    def flag_type(self) -> str:
        return self.inner.flag_type()


def allow_none_overrides() -> None:
    """Lets `--config.<key>=None` set an int, float or str key to None (ml_collections parses
    "None" as the field's type, and fails); check_override_names refuses it for keys that need a value."""
    for kind, inner in ((int, flags.IntegerParser()), (float, flags.FloatParser()), (str, flags.ArgumentParser())):
        config_flags.register_flag_parser_for_type(kind, _NoneOr(inner))


def parse_variant(arg: str | None, **defaults):
    """Returns a ConfigDict of a config file's variant argument ("size=b,alpha=0.9") over its
    defaults; values are Python literals or bare strings, of the default's type."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: write key=value with key one of {sorted(defaults)}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        kind = type(defaults[key])
        try:
            out[key] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"config argument {item!r}: {key} takes a {kind.__name__}") from None
    return out


def config_module(path: str):
    """Returns the module of a config file (configs/*.py): `config_module(path).get_config(arg)`
    is the config that main.py's `--config=path:arg` gives."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"vicregl_config_{name}", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a config file: pass e.g. configs/r50.py.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path_and_arg: str) -> ml_collections.ConfigDict:
    """Returns the config of "configs/x.py[:arg]", as main.py's --config gives it."""
    path, _, arg = path_and_arg.partition(":")
    return config_module(path).get_config(arg or None)
