"""The settings of a segmentation evaluation: the release's mmsegmentation protocol per
backbone family and dataset layout (docs/segmentation.md), defined here once, with the
overrides of config.eval.segment over them (its None values keep the release's).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from flax import nnx

from vicregl_jax import data as data_lib
from vicregl_jax.models import ConvNeXt, ResNet

IGNORE_LABEL = 255  # as the masks of vicregl_jax.data.segmentation
PROTOCOLS = ("release", "fast")
FAMILIES = ("resnet", "convnext")

# The release's protocol per backbone family: (setting, ResNet's value, ConvNeXt's value).
_FAMILY_PROTOCOLS = (
    ("features", "last", "concat"),
    ("output_stride", 8, 32),
    ("dropout", 0.1, 0.0),
    ("optimizer", "sgd", "adamw"),
    ("lr", 0.01, 1e-4),  # convnext_xlarge: 8e-5
    ("weight_decay", 5e-4, 0.05),
    ("power", 0.9, 1.0),
    ("min_lr", 1e-4, 0.0),
    ("warmup_steps", 0, 1500),
    ("inference", "whole", "slide"),
)


@dataclasses.dataclass(frozen=True)
class SegmentSettings:
    """Everything a segmentation evaluation depends on (see `segment_settings` for defaults).

    features: "last" (the last stage of the ResNet dilated to output_stride) or "concat"
    (all stages resized to the stride-4 map). inference: "whole" or "slide" (windows of
    crop_size every slide_stride pixels). scale: (long, short) bounds of the image rescale.
    warmup_steps / warmup_ratio: lr multiplied by 1 - (1 - t / warmup) (1 - ratio) before
    warmup_steps. eval_batch_size: images per evaluation step (all devices).
    """

    protocol: str
    features: str
    output_stride: int
    dropout: float
    optimizer: str
    lr: float
    weight_decay: float
    power: float
    min_lr: float
    warmup_steps: int
    warmup_ratio: float
    steps: int
    batch_size: int
    crop_size: tuple[int, int]
    scale: tuple[int, int]
    ratio_range: tuple[float, float]
    cat_max_ratio: float
    inference: str
    slide_stride: tuple[int, int]
    eval_batch_size: int
    checkpoint_every: int
    fast_image_size: int
    train_split: str
    split: str


def backbone_family(backbone: nnx.Module) -> str:
    """Returns "resnet" or "convnext", the family whose protocol the backbone gets."""
    if isinstance(backbone, ResNet):
        return "resnet"
    if isinstance(backbone, ConvNeXt):
        return "convnext"
    raise ValueError(f"no segmentation protocol for a {type(backbone).__name__}: use a ResNet or a ConvNeXt backbone")


def segment_settings(family: str, dataset: str, *, arch: str = "", **overrides) -> SegmentSettings:
    """Returns the release's settings for a backbone family ("resnet" | "convnext") on the
    dataset "LAYOUT:PATH", with overrides (None values keep the default).

    arch: the architecture of the backbone evaluated (convnext_xlarge gets lr 8e-5, as the
    release).
    """
    layout, _ = data_lib.segmentation.parse_dataset(dataset)
    if family not in FAMILIES:
        raise ValueError(f"backbone family {family!r}: use 'resnet' or 'convnext'")
    column = 1 + FAMILIES.index(family)
    base = {row[0]: row[column] for row in _FAMILY_PROTOCOLS}
    if family == "convnext" and arch == "convnext_xlarge":
        base["lr"] = 8e-5
    values = dict(
        protocol="release",
        warmup_ratio=1e-6,
        steps=layout.steps,
        batch_size=layout.batch_size,
        crop_size=layout.crop_size,
        scale=layout.scale,
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        slide_stride=(341, 341),
        eval_batch_size=16,
        checkpoint_every=4000,
        fast_image_size=320,
        train_split=layout.train_split,
        split=layout.eval_split,
        **base,
    )
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown segmentation settings {unknown}: use some of {sorted(values)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("crop_size", "scale", "slide_stride", "ratio_range"):
        values[key] = tuple(values[key])
    settings = SegmentSettings(**values)
    _check(settings, layout)
    return settings


def _check(s: SegmentSettings, layout) -> None:
    choices = {
        "protocol": PROTOCOLS,
        "features": ("last", "concat"),
        "optimizer": ("sgd", "adamw"),
        "inference": ("whole", "slide"),
        "output_stride": (8, 16, 32),
    }
    for key, allowed in choices.items():
        if getattr(s, key) not in allowed:
            raise ValueError(f"segment {key}={getattr(s, key)!r}: use one of {allowed}")
    for key in ("steps", "batch_size", "eval_batch_size", "checkpoint_every", "fast_image_size"):
        if getattr(s, key) < 1:
            raise ValueError(f"segment {key}={getattr(s, key)}: use a positive value")
    for key in ("crop_size", "scale", "slide_stride"):
        if len(getattr(s, key)) != 2 or min(getattr(s, key)) < 1:
            raise ValueError(f"segment {key}={getattr(s, key)}: give two positive sizes")
    for key in ("train_split", "split"):
        if getattr(s, key) not in layout.splits:
            raise ValueError(f"segment {key}={getattr(s, key)!r}: {layout.name} has splits {layout.splits}")
    if not 0.0 <= s.dropout < 1.0:
        raise ValueError(f"segment dropout={s.dropout}: use a value in [0, 1)")


def arch_family(arch: str) -> str:
    """Returns "resnet" or "convnext", the family whose protocol the architecture gets."""
    return "convnext" if arch.startswith("convnext") else "resnet"


def settings_from_config(section: ml_collections.ConfigDict, family: str, *, arch: str = "") -> SegmentSettings:
    """Returns the settings config.eval.segment (`section`) asks for, for a backbone of that
    family and arch: its dataset, and every setting it gives over the release's values."""
    if not section.get("dataset"):
        raise ValueError(
            "set config.eval.segment.dataset, e.g. "
            "--config.eval.segment.dataset=voc:/data/VOCdevkit (see docs/segmentation.md)"
        )
    fields = {f.name for f in dataclasses.fields(SegmentSettings)}
    unknown = sorted(set(section.keys()) - fields - {"dataset"})
    if unknown:
        raise ValueError(
            f"config.eval.segment.{unknown[0]} is not a segmentation setting (the "
            "class count comes from the dataset's layout); use "
            f"{', '.join(sorted(fields | {'dataset'}))}"
        )
    overrides = {k: v for k, v in section.items() if k in fields}
    return segment_settings(family, section.dataset, arch=arch, **overrides)
