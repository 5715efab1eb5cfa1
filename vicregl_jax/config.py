"""The run configuration: defaults shared by every configs/*.py file, and its validation.

Every key is documented here; configs/ files override what their recipe changes. A config
is validated before anything starts (`validate`), so a bad value fails in a second with a
message naming the key and the fix, not an hour into a run.
"""

from __future__ import annotations

import ast
import re

import ml_collections
from ml_collections import config_dict


def default_config() -> ml_collections.ConfigDict:
    """Returns the defaults (the release's ResNet-50 recipe at batch 2048) for every key."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Data (SPEC.md section 1). crops: (size, count, min_scale, max_scale) per group; the
    # first group holds the two large views every pair is anchored on.
    c.dataset = "imagenet2012"
    c.train_split = "train"
    c.eval_split = "validation"
    c.data_dir = config_dict.placeholder(str)
    c.manual_dir = config_dict.placeholder(str)
    c.crops = ((224, 2, 0.08, 1.0),)
    c.flip_grid = False  # the release leaves the grid of a flipped view unflipped
    c.num_classes = 1000  # online classifier outputs (labels of the pre-training data)
    c.num_train_examples = config_dict.placeholder(int)  # None: read from the dataset

    # Model (SPEC.md section 2).
    c.arch = "resnet50"
    c.mlp = "8192-8192-8192"
    c.maps_mlp = "512-512-512"
    c.drop_path_rate = config_dict.placeholder(float)  # ConvNeXt only; None: 0.1
    c.layer_scale_init = config_dict.placeholder(float)  # ConvNeXt only; None: 0 (off)
    c.compute_dtype = "auto"  # "auto": bfloat16 on GPU / TPU, float32 on CPU
    c.init_weights = config_dict.placeholder(str)  # a release .pth / .safetensors or a workdir

    # Criterion (SPEC.md section 3).
    c.alpha = 0.75
    c.inv_coeff = 25.0
    c.var_coeff = 25.0
    c.cov_coeff = 1.0
    c.num_matches = (20, 4)
    c.l2_all_matches = True
    c.fast_vc_reg = False

    # Optimisation (SPEC.md section 4). batch_size is the global batch over all hosts.
    c.batch_size = 2048
    c.epochs = 300
    c.warmup_epochs = 10
    c.optimizer = "lars"
    c.base_lr = 0.2
    c.end_lr_ratio = 0.001
    c.weight_decay = 1e-6
    c.total_steps = config_dict.placeholder(int)  # None: epochs * examples // batch_size
    c.grad_accum_steps = 1  # >1: statistics are per micro-batch (see README)

    # Devices and sharding.
    c.num_devices = config_dict.placeholder(int)  # None: every device of every host
    c.param_sharding = "replicated"  # or "fsdp" (large models)
    c.sharding_rules = ()  # ((regex, "fsdp" | "replicated"), ...) on parameter paths

    # Checkpoints and logs.
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.log_every_steps = 50
    c.knn_every_epochs = 0.0  # >0: kNN on eval_dataset every this many epochs and at the end
    c.mode = "pretrain"  # what main.py runs when --mode is not given

    # Evaluation (python main.py --mode=linear | knn | segment | correspond | export).
    c.eval_dataset = config_dict.placeholder(str)  # None: the pre-training dataset
    c.eval_train_split = "train"
    c.eval_batch_size = 256
    c.eval_image_size = 224
    c.eval_resize_size = 256
    c.linear_mode = "protocol"  # or "fast": features of centre crops computed once
    c.linear_epochs = 100
    c.linear_lr = config_dict.placeholder(float)  # None: 0.02 for ResNets, 0.3 for ConvNeXts
    c.linear_weight_decay = 1e-6
    c.knn_k = 20
    c.knn_temperature = 0.07
    c.seg_dataset = "voc/2012"  # TFDS name with segmentation masks, or folder:PATH of images/ + masks/
    c.seg_train_split = "train"
    c.seg_eval_split = "validation"
    c.seg_num_classes = 21
    c.seg_image_size = 512
    c.seg_steps = 40000
    c.seg_batch_size = 16
    c.correspond_pairs = 256
    c.correspond_crop_size = 224
    c.correspond_scale = (0.3, 1.0)
    return c


def convnext_recipe(arch: str):
    """Returns the release's ConvNeXt recipe for arch (shared by the ConvNeXt configs)."""
    c = default_config()
    c.arch = arch
    c.dataset = "imagenet2012"
    c.num_classes = 1000
    c.crops = ((224, 2, 0.4, 1.0), (96, 6, 0.08, 0.4))
    c.alpha = 0.75
    c.mlp = "8192-8192-8192"
    c.maps_mlp = "512-512-512"
    c.drop_path_rate = 0.1
    c.layer_scale_init = 0.0
    c.optimizer = "adamw"
    c.batch_size = 576
    c.base_lr = 0.0005
    c.weight_decay = 0.05
    c.epochs = 400
    c.warmup_epochs = 10
    return c


def parse_arg(arg: str | None) -> dict:
    """Returns the key=value pairs of a config argument string ("alpha=0.9,arch=resnet18")."""
    out = {}
    # Split at the commas that start a new key=, so tuple values like (20,4) stay whole.
    for item in filter(None, re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", arg or "")):
        if "=" not in item:
            raise ValueError(f"Config argument {item!r} is not key=value; write e.g. 'alpha=0.9'.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def config_module(path: str):
    """Returns the module of a config file (configs/*.py): `config_module(path).get_config(arg)`
    is the config that main.py's `--config=path:arg` gives."""
    import importlib.util
    import os

    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"vicregl_config_{name}", path)
    if spec is None:
        raise FileNotFoundError(f"{path} is not a config file: pass e.g. configs/r50.py.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies "key=value,..." overrides to config; values are Python literals (strings may be
    bare), checked against the key's type by ConfigDict."""
    for key, text in parse_arg(arg).items():
        if key not in config:
            raise ValueError(f"Config argument {key!r} is not a config key; known keys: {sorted(config.keys())}.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if config.get_type(key) is bool and isinstance(value, int):
            value = bool(value)
        elif config.get_type(key) is str and not isinstance(value, str):
            value = text
        try:
            config[key] = value
        except TypeError as e:
            raise ValueError(f"Config argument {key}={text!r} has the wrong type for that key: {e}") from None
    return config


def _error(key: str, value, fix: str) -> ValueError:
    return ValueError(f"config.{key}={value!r}: {fix}")


def validate(config, *, num_devices: int, process_count: int = 1) -> None:
    """Raises ValueError naming the key and the fix for any value the run cannot use."""
    from vicregl_jax import models, optim  # noqa: F401  (registry of architectures)

    if config.arch not in models.ARCHITECTURES:
        raise _error("arch", config.arch, f"unknown architecture; use one of {', '.join(models.ARCHITECTURES)}.")
    if not 0.0 <= config.alpha <= 1.0:
        raise _error("alpha", config.alpha, "must lie in [0, 1] (0.75 or 0.9 in the release).")
    if config.optimizer not in optim.OPTIMIZERS:
        raise _error("optimizer", config.optimizer, f"use one of {sorted(optim.OPTIMIZERS)}.")
    if config.compute_dtype not in ("auto", "float32", "bfloat16"):
        raise _error("compute_dtype", config.compute_dtype, "use 'auto', 'float32' or 'bfloat16'.")
    for key in ("mlp", "maps_mlp"):
        spec = config[key]
        if not spec or any(not part.isdigit() or int(part) < 1 for part in str(spec).split("-")):
            raise _error(key, spec, "write the layer widths joined by '-', e.g. '8192-8192-8192'.")

    accum = config.grad_accum_steps
    if accum < 1:
        raise _error("grad_accum_steps", accum, "must be 1 or more.")
    if config.batch_size % (num_devices * accum):
        raise _error(
            "batch_size", config.batch_size,
            f"must be divisible by the number of devices ({num_devices}) times grad_accum_steps ({accum}); "
            f"use a multiple of {num_devices * accum}.",
        )
    if config.batch_size % process_count:
        raise _error("batch_size", config.batch_size, f"must be divisible by the number of hosts ({process_count}).")
    if config.batch_size // accum < 2:
        raise _error("batch_size", config.batch_size, "the variance over a batch of 1 is undefined; use 2 or more per micro-batch.")

    crops = [tuple(g) for g in config.crops]
    if not crops or any(len(g) != 4 for g in crops):
        raise _error("crops", config.crops, "give (size, count, min_scale, max_scale) per group, e.g. ((224, 2, 0.08, 1.0),).")
    if crops[0][1] < 2:
        raise _error("crops", config.crops, "the first group needs at least 2 views (the two large crops).")
    stride = models.backbone_stride(config.arch)
    for size, count, lo, hi in crops:
        if size % stride or size < stride:
            raise _error(
                "crops", config.crops,
                f"crop size {size} does not give a whole grid for {config.arch} (stride {stride}); "
                f"use a multiple of {stride}, e.g. {max(stride, round(size / stride) * stride)}.",
            )
        if count < 1 or not 0.0 < lo <= hi <= 1.0:
            raise _error("crops", config.crops, f"group ({size}, {count}, {lo}, {hi}) needs count >= 1 and 0 < min_scale <= max_scale <= 1.")
    if config.alpha < 1.0:
        large = min((s // stride) ** 2 for s, _, _, _ in crops[:1])
        smallest = min((s // stride) ** 2 for s, _, _, _ in crops)
        nm = tuple(config.num_matches)
        if len(nm) != 2 or min(nm) < 1 or nm[0] > large or nm[1] > smallest:
            raise _error(
                "num_matches", nm,
                f"the large views have {large} locations and the smallest {smallest}: use two positive "
                f"counts of at most ({large}, {smallest}).",
            )
    if config.num_classes < 1:
        raise _error("num_classes", config.num_classes, "must be 1 or more.")
    if config.param_sharding not in ("replicated", "fsdp"):
        raise _error("param_sharding", config.param_sharding, "use 'replicated' or 'fsdp'.")
    if config.epochs <= config.warmup_epochs and config.total_steps is None:
        raise _error("warmup_epochs", config.warmup_epochs, f"must be below epochs ({config.epochs}).")
    if config.knn_every_epochs < 0:
        raise _error("knn_every_epochs", config.knn_every_epochs, "use 0 (no kNN monitor) or a positive number of epochs.")
    for key in ("checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
        if config[key] < 1:
            raise _error(key, config[key], "must be 1 or more.")
