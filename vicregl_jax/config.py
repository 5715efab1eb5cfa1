"""The run configuration: a nested ml_collections config whose subtrees are the arguments of
the constructors that own them, and the checks that span several parts.

    config.data        the input pipeline (dataset, crops, ...)
    config.model       VICRegLModel (arch, heads, classifier, compute dtype, initial weights)
    config.loss        losses.LossConfig (alpha, coefficients, matches)
    config.optim       the optimiser and its learning-rate schedule
    config.mesh        devices and parameter sharding
    config.checkpoint  Orbax checkpoints of the training state
    config.eval        the evaluations: shared settings, then knn / linear / segment / correspond

Every key is documented in `default_config`; configs/*.py files change only what their recipe
changes. On the command line any key is set with `--config.a.b=value`. Each constructor
validates the subtree it owns (LossConfig its alpha and matches, the model its architecture
and heads, the optimiser its name); `check_values` checks single values no run can use and
`validate` only the facts that span parts (batch vs devices, crop size vs the backbone's
stride, matches vs locations). build.check_config runs them, once per run, before anything
starts. Reading a config file and checking `--config.` names: `vicregl_jax.config_files`.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
from ml_collections import config_dict

from vicregl_jax import models


def default_config() -> ml_collections.ConfigDict:
    """Returns the defaults (the release's ResNet-50 recipe at batch 2048) for every key."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mode = "pretrain"  # what main.py runs when --mode is not given
    # The schedule. batch_size is the global batch over all hosts and devices.
    c.batch_size = 2048
    c.epochs = 300
    c.total_steps = config_dict.placeholder(int)  # None: epochs * examples // batch_size
    c.grad_accum_steps = 1  # >1: statistics are per micro-batch (see README)
    c.log_every_steps = 50
    c.knn_every_epochs = 0.0  # >0: kNN on config.eval's dataset every this many epochs and at the end
    # JAX's persistent compilation cache, so that a restart does not compile again. None:
    # WORKDIR/compilation_cache ($JAX_COMPILATION_CACHE_DIR when set); "off": none; or a path (gs:// too).
    c.compilation_cache_dir = config_dict.placeholder(str)
    # Resuming a workdir under a config that changes what the run computes (RESUME_KEYS) is
    # refused unless this is True; the changes are then logged and the new config is written
    # beside the old one as config.<step>.json.
    c.allow_config_change = False

    # The input pipeline (the release's multi-crop views). crops: (size, count, min_scale, max_scale) per
    # group; the first group holds the two large views every pair is anchored on.
    c.data = ml_collections.ConfigDict()
    c.data.dataset = "imagenet2012"  # a TFDS name, an embedded one, or folder:PATH
    c.data.split = "train"
    c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir (local or gs://)
    c.data.manual_dir = config_dict.placeholder(str)  # TFDS manual downloads (ImageNet's tars)
    c.data.crops = ((224, 2, 0.08, 1.0),)
    c.data.flip_grid = False  # the release leaves the grid of a flipped view unflipped
    c.data.num_examples = config_dict.placeholder(int)  # None: read from the dataset
    # How each host reads (data.ReadOptions): "INTEGER_FAST" decodes JPEGs a little faster with
    # pixels that differ from PIL's; num_threads None = the CPUs this process may use; training
    # stops when more than max_failure_share of the last failure_window images fail to read.
    c.data.jpeg_dct_method = "INTEGER_ACCURATE"
    c.data.num_threads = config_dict.placeholder(int)
    c.data.max_failure_share = 0.01
    c.data.failure_window = 10_000
    # "pillow": views resized as Pillow resizes them, byte for byte, by a compiled kernel;
    # "tensorflow": tf.image.resize, 4-6x slower on the host, what tf.data service workers run.
    c.data.resize = "pillow"
    # Training reads blocks of read_block consecutive records, one request each, shuffled within
    # windows of shuffle_window examples per host (docs/pipeline.md); read_block=1: one request
    # per example, a full shuffle per epoch.
    c.data.read_block = 64
    c.data.shuffle_window = 1024
    # A tf.data service dispatcher ("grpc://HOST:PORT", started with `python -m
    # vicregl_jax.data.service dispatcher`) whose workers make the pre-training batches; None: this host.
    c.data.service = config_dict.placeholder(str)

    # VICRegLModel (backbone, expander, local projector, classifier); config.loss.alpha decides which heads exist.
    c.model = ml_collections.ConfigDict()
    c.model.arch = "resnet50"
    c.model.mlp = "8192-8192-8192"  # the expander
    c.model.maps_mlp = "512-512-512"  # the local projector
    c.model.num_classes = 1000  # online classifier outputs (labels of the pre-training data)
    c.model.drop_path_rate = config_dict.placeholder(float)  # ConvNeXt only; None: 0.1
    c.model.layer_scale_init = config_dict.placeholder(float)  # ConvNeXt only; None: 0 (off)
    c.model.dtype = "auto"  # compute dtype; "auto": bfloat16 on GPU / TPU, float32 on CPU
    # Per block, kept for the backward pass: "dots" (matmul / conv outputs), "none" (all), "block" (inputs).
    c.model.remat = "dots"
    # The scans over a stage's blocks: None unrolls them on CPU only (XLA:CPU runs convolutions
    # inside loops ~8x slower), True / False everywhere. Same parameters either way.
    c.model.unroll_blocks = config_dict.placeholder(bool)
    c.model.init_weights = config_dict.placeholder(str)  # a release .pth / .safetensors, a workdir, or release:NAME

    # The criterion: the fields of losses.LossConfig.
    c.loss = ml_collections.ConfigDict()
    c.loss.alpha = 0.75
    c.loss.inv_coeff = 25.0
    c.loss.var_coeff = 25.0
    c.loss.cov_coeff = 1.0
    c.loss.num_matches = (20, 4)
    c.loss.l2_all_matches = True
    c.loss.fast_vc_reg = False

    # Optimisation, as the release: peak lr = base_lr * batch_size / 256.
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "lars"  # or "adamw"
    c.optim.base_lr = 0.2
    c.optim.end_lr_ratio = 0.001
    c.optim.weight_decay = 1e-6
    c.optim.warmup_epochs = 10

    # Devices and parameter sharding.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.num_devices = config_dict.placeholder(int)  # None: every device of every host
    c.mesh.param_sharding = "replicated"  # or "fsdp" (large models)
    c.mesh.rules = ()  # ((regex, "fsdp" | "replicated"), ...) on parameter paths

    # Checkpoints of the training state.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3

    # Evaluation (python main.py --mode=linear | knn | segment | correspond | export).
    c.eval = ml_collections.ConfigDict()
    c.eval.dataset = config_dict.placeholder(str)  # None: the pre-training dataset
    c.eval.train_split = "train"
    c.eval.split = "validation"
    c.eval.batch_size = 256
    c.eval.image_size = 224
    c.eval.resize_size = 256
    c.eval.knn = ml_collections.ConfigDict({"k": 20, "temperature": 0.07})
    c.eval.linear = ml_collections.ConfigDict()
    c.eval.linear.mode = "protocol"  # or "fast": features of centre crops computed once
    c.eval.linear.epochs = 100
    c.eval.linear.lr = config_dict.placeholder(float)  # None: 0.02 for ResNets, 0.3 for ConvNeXts
    c.eval.linear.weight_decay = 1e-6
    c.eval.linear.checkpoint_every_epochs = 10  # head checkpoints under WORKDIR/linear_head (a rerun resumes)
    # Linear segmentation as the release's mmsegmentation configs (docs/segmentation.md). Every
    # setting but the dataset is None: the release's value for the loaded backbone's family
    # (and arch) and the dataset's layout, defined in evaluate/segment_settings.py.
    c.eval.segment = ml_collections.ConfigDict()
    c.eval.segment.dataset = config_dict.placeholder(str)  # "voc:PATH" | "ade20k:PATH" | "cityscapes:PATH" (required)
    c.eval.segment.protocol = config_dict.placeholder(str)  # "release", or "fast" (cached features; not comparable)
    c.eval.segment.train_split = config_dict.placeholder(str)
    c.eval.segment.split = config_dict.placeholder(str)
    c.eval.segment.steps = config_dict.placeholder(int)
    c.eval.segment.batch_size = config_dict.placeholder(int)
    c.eval.segment.optimizer = config_dict.placeholder(str)  # "sgd" | "adamw"
    c.eval.segment.lr = config_dict.placeholder(float)
    c.eval.segment.weight_decay = config_dict.placeholder(float)
    c.eval.segment.crop_size = config_dict.placeholder(tuple)
    c.eval.segment.scale = config_dict.placeholder(tuple)  # (long, short) bounds of the test rescale
    c.eval.segment.inference = config_dict.placeholder(str)  # "whole" | "slide"
    c.eval.segment.slide_stride = config_dict.placeholder(tuple)
    c.eval.segment.eval_batch_size = config_dict.placeholder(
        int
    )  # images per evaluation step (a multiple of the devices)
    c.eval.segment.checkpoint_every = config_dict.placeholder(int)  # head checkpoints under WORKDIR/segment_head
    c.eval.segment.fast_image_size = config_dict.placeholder(int)
    c.eval.correspond = ml_collections.ConfigDict()
    c.eval.correspond.pairs = 256
    c.eval.correspond.crop_size = 224
    c.eval.correspond.scale = (0.3, 1.0)
    return c


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Returns the dotted names of every leaf key of a nested config."""
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += all_keys(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


# --------------------------------------------------------------------------------------------
# Checks that span parts
# --------------------------------------------------------------------------------------------


def _error(key: str, value, fix: str) -> ValueError:
    return ValueError(f"config.{key}={value!r}: {fix}")


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def check_values(config) -> None:
    """Raises ValueError naming the key for a value that no run can use (a count below 1, a
    negative rate, decay or coefficient); checks nothing that depends on the machine."""
    if config.total_steps is not None and config.total_steps < 1:
        raise _error(
            "total_steps", config.total_steps, "must be 1 or more; leave it unset (None) to train for config.epochs."
        )
    if config.total_steps is None and not config.epochs > 0:
        raise _error("epochs", config.epochs, "must be above 0 (or set config.total_steps).")
    if config.batch_size < 1:
        raise _error("batch_size", config.batch_size, "must be 1 or more (the global batch over all devices).")
    if config.data.num_examples is not None and config.data.num_examples < 1:
        raise _error(
            "data.num_examples",
            config.data.num_examples,
            "must be 1 or more; leave it unset to read it from the dataset.",
        )
    if config.mesh.num_devices is not None and config.mesh.num_devices < 1:
        raise _error("mesh.num_devices", config.mesh.num_devices, "must be 1 or more; leave it unset for every device.")
    for key in (
        "optim.base_lr",
        "optim.weight_decay",
        "optim.end_lr_ratio",
        "optim.warmup_epochs",
        "loss.inv_coeff",
        "loss.var_coeff",
        "loss.cov_coeff",
    ):
        value = _get(config, key)
        if value is None or not value >= 0:  # also NaN
            raise _error(key, value, "must be 0 or more.")
        if not math.isfinite(value):
            raise _error(key, value, "must be a finite number, 0 or more.")
    _check_peak_lr(config)
    for key in ("eval.batch_size", "eval.image_size", "eval.linear.epochs", "eval.linear.checkpoint_every_epochs"):
        if _get(config, key) < 1:
            raise _error(key, _get(config, key), "must be 1 or more.")


def _check_peak_lr(config) -> None:
    """Raises ValueError when the schedule's peak, base_lr * batch_size / 256, overflows float32
    (the step computes the learning rate in float32: it would be Inf, the update NaN)."""
    limit = float(np.finfo(np.float32).max) * 256 / max(1, config.batch_size)
    if config.optim.base_lr > limit:
        raise _error(
            "optim.base_lr",
            config.optim.base_lr,
            f"the peak learning rate base_lr * batch_size / 256 overflows float32: give a value from 0 to "
            f"{limit:.3g} for config.batch_size={config.batch_size} (the recipes use 0.0005 to 0.3).",
        )


def validate(config, *, num_devices: int, process_count: int = 1) -> None:
    """Raises ValueError naming the key and the fix for a combination the run cannot use.

    Only facts that span parts are checked here (and single values no run can use, see
    check_values); each constructor checks its own subtree.
    """
    check_values(config)
    if not config.data.dataset:
        raise _error(
            "data.dataset",
            config.data.dataset,
            "give the pre-training data: a TFDS name, or a folder as --config.data.dataset=folder:PATH "
            "(e.g. folder:gs://BUCKET/imagenet22k).",
        )
    if config.model.arch not in models.ARCHITECTURES:
        raise _error(
            "model.arch", config.model.arch, f"unknown architecture; use one of {', '.join(models.ARCHITECTURES)}."
        )
    accum = config.grad_accum_steps
    if accum < 1:
        raise _error("grad_accum_steps", accum, "must be 1 or more.")
    if config.batch_size % (num_devices * accum):
        raise _error(
            "batch_size",
            config.batch_size,
            f"must be divisible by the number of devices ({num_devices}) times grad_accum_steps ({accum}); "
            f"use a multiple of {num_devices * accum}.",
        )
    if config.batch_size % process_count:
        raise _error("batch_size", config.batch_size, f"must be divisible by the number of hosts ({process_count}).")
    if config.batch_size // accum < 2:
        raise _error(
            "batch_size",
            config.batch_size,
            "the variance over a batch of 1 is undefined; use 2 or more per micro-batch.",
        )

    crops = [tuple(g) for g in config.data.crops]
    if not crops or any(len(g) != 4 for g in crops):
        raise _error(
            "data.crops",
            config.data.crops,
            "give (size, count, min_scale, max_scale) per group, e.g. ((224, 2, 0.08, 1.0),).",
        )
    if crops[0][1] < 2:
        raise _error("data.crops", config.data.crops, "the first group needs at least 2 views (the two large crops).")
    stride = models.backbone_stride(config.model.arch)
    for size, _count, _lo, _hi in crops:
        if size % stride or size < stride:
            raise _error(
                "data.crops",
                config.data.crops,
                f"crop size {size} does not give a whole grid for {config.model.arch} (stride {stride}); "
                f"use a multiple of {stride}, e.g. {max(stride, round(size / stride) * stride)}.",
            )
    if config.loss.alpha < 1.0:
        large = (crops[0][0] // stride) ** 2
        smallest = min((s // stride) ** 2 for s, _, _, _ in crops)
        nm = tuple(config.loss.num_matches)
        if len(nm) != 2 or min(nm) < 1 or nm[0] > large or nm[1] > smallest:
            raise _error(
                "loss.num_matches",
                nm,
                f"the large views have {large} locations and the smallest {smallest}: use two positive "
                f"counts of at most ({large}, {smallest}).",
            )
    if config.total_steps is None and config.epochs <= config.optim.warmup_epochs:
        raise _error("optim.warmup_epochs", config.optim.warmup_epochs, f"must be below epochs ({config.epochs}).")
    if config.knn_every_epochs < 0:
        raise _error(
            "knn_every_epochs", config.knn_every_epochs, "use 0 (no kNN monitor) or a positive number of epochs."
        )
    for key in ("log_every_steps", "checkpoint.every_steps", "checkpoint.keep"):
        value = _get(config, key)
        if value < 1:
            raise _error(key, value, "must be 1 or more.")


# --------------------------------------------------------------------------------------------
# Resuming under another config
# --------------------------------------------------------------------------------------------

# What a run computes: a resumed run whose config differs in one of these (or in a key under
# one of these sections) is refused unless config.allow_config_change. The keys that define
# the state's shapes are refused by the checkpoint itself, whatever this flag says.
# Everything else (logging, checkpoint cadence, devices and sharding, data locations, the
# evaluations) may change between a run and its resumption.
RESUME_KEYS = (
    "seed",
    "batch_size",
    "epochs",
    "total_steps",
    "grad_accum_steps",
    "data.dataset",
    "data.split",
    "data.crops",
    "data.flip_grid",
    "data.num_examples",
    "data.read_block",
    "data.shuffle_window",
    "model",
    "loss",
    "optim",
)
RESUME_FREE_KEYS = ("model.init_weights",)  # read only when a run starts


def _normalised(value):
    if isinstance(value, (list, tuple)):
        return tuple(_normalised(v) for v in value)
    return value


def resume_changes(
    saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, ignore: tuple[str, ...] = ()
) -> list[tuple[str, object, object]]:
    """Returns (key, saved value, new value) for every key of RESUME_KEYS (but not of ignore)
    that differs."""
    changes = []
    for key in all_keys(config):
        if (
            key in RESUME_FREE_KEYS
            or key in ignore
            or not any(key == k or key.startswith(k + ".") for k in RESUME_KEYS)
        ):
            continue
        try:
            old = _get(saved, key)
        except (KeyError, AttributeError):
            continue  # a key the saved config predates
        new = _get(config, key)
        if _normalised(old) != _normalised(new):
            changes.append((key, old, new))
    return changes
