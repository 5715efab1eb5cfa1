"""Backbone registry: the release's ResNets and ConvNeXts plus tiny test variants.

Every backbone maps NHWC float32 images (B, H, W, 3) to ``(maps, pooled)``: maps
(B, h*w, C) flattened row-major and pooled (B, C), both float32 whatever the compute
dtype; ``backbone.stage_maps(images)`` gives the 4 stages' NHWC outputs (dense
prediction). ResNets also come dilated to output stride 16 or 8 (``output_stride=``, same
parameters; ``with_output_stride`` makes one from a loaded ResNet). Train / eval:
``model.train()`` / ``model.eval()`` (in place) or
``nnx.view(model, use_running_average=..., deterministic=...)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vicregl_jax.models.convnext import ConvNeXt
from vicregl_jax.models.resnet import OUTPUT_STRIDES, ResNet

_RESNETS = {
    # name: (block, stage sizes, width = 64 * widen)
    "resnet18": ("basic", (2, 2, 2, 2), 64),
    "resnet34": ("basic", (3, 4, 6, 3), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 64),
    "resnet50x2": ("bottleneck", (3, 4, 6, 3), 128),
    "resnet50x4": ("bottleneck", (3, 4, 6, 3), 256),
    "resnet50x5": ("bottleneck", (3, 4, 6, 3), 320),
    "resnet200x2": ("bottleneck", (3, 24, 36, 3), 128),
    "resnet_test": ("basic", (1, 1, 1, 1), 8),  # channels 8-16-32-64: for tests
}
_CONVNEXTS = {
    # name: (depths, dims)
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
    "convnext_test": ((1, 1, 1, 1), (8, 16, 32, 64)),  # for tests
}

ARCHITECTURES: dict[str, Callable[..., nnx.Module]] = {
    **{
        name: functools.partial(ResNet, block=block, stage_sizes=sizes, width=width)
        for name, (block, sizes, width) in _RESNETS.items()
    },
    **{name: functools.partial(ConvNeXt, depths=depths, dims=dims) for name, (depths, dims) in _CONVNEXTS.items()},
}


def _check_name(name: str) -> str:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}: use one of {', '.join(ARCHITECTURES)}")
    return name


def create_backbone(name: str, *, rngs: nnx.Rngs, dtype=jnp.float32, output_stride: int = 32, **kwargs) -> nnx.Module:
    """Returns the backbone `name`; kwargs go to its constructor (e.g. drop_path_rate, remat).

    output_stride: 32, or 16 / 8 for a dilated ResNet (ConvNeXts have only 32).
    """
    if _check_name(name) in _RESNETS:
        kwargs["output_stride"] = output_stride
    elif output_stride != 32:
        raise ValueError(
            f"output_stride={output_stride} for {name}: only ResNets have dilated "
            "variants; use output_stride=32 (the default)"
        )
    return ARCHITECTURES[name](rngs=rngs, dtype=dtype, **kwargs)


def with_output_stride(backbone: ResNet, output_stride: int) -> ResNet:
    """Returns the ResNet `backbone` dilated to output_stride, sharing its arrays and mode.

    The parameters and BatchNorm statistics are the same arrays (a dilated ResNet has the
    same parameter tree), so weights loaded or trained at one output stride serve at another.
    """
    if not isinstance(backbone, ResNet):
        raise TypeError(
            f"with_output_stride needs a ResNet, got {type(backbone).__name__}: only ResNets have dilated variants"
        )
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride={output_stride}: use one of {OUTPUT_STRIDES}")
    if backbone.output_stride == output_stride:
        return backbone
    dilated = nnx.eval_shape(
        lambda: ResNet(
            block=backbone.block,
            stage_sizes=backbone.stage_sizes,
            width=backbone.width,
            output_stride=output_stride,
            dtype=backbone.dtype,
            remat=backbone.remat,
            scan=backbone.scan,
            unroll=backbone.unroll,
            rngs=nnx.Rngs(0),
        )
    )
    nnx.update(dilated, nnx.state(backbone))
    if backbone.bn1.use_running_average:
        dilated.eval()
    return dilated


def abstract_backbone(name: str, layer_scale_init: float = 0.0) -> nnx.Module:
    """Returns the backbone built with nnx.eval_shape: shapes only, nothing allocated.

    Cached: do not mutate the returned module.
    """
    return _abstract_backbone(_check_name(name), float(layer_scale_init))


@functools.cache
def _abstract_backbone(name: str, layer_scale_init: float) -> nnx.Module:
    kwargs = {"layer_scale_init": layer_scale_init} if layer_scale_init else {}
    return nnx.eval_shape(lambda: create_backbone(name, rngs=nnx.Rngs(0), **kwargs))


def parameter_count(name: str) -> int:
    """Returns the number of trainable parameters of the backbone `name`."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_backbone(name), nnx.Param)))


def backbone_stride(name: str) -> int:
    """Returns the total stride of the backbone's feature map (32 for all of them)."""
    _check_name(name)
    return 32


def stage_channels(name: str) -> tuple[int, ...]:
    """Returns the channels of the backbone's 4 stage outputs (``stage_maps``)."""
    if _check_name(name) in _RESNETS:
        block, _, width = _RESNETS[name]
        return tuple(width * 2**i * (4 if block == "bottleneck" else 1) for i in range(4))
    return tuple(_CONVNEXTS[name][1])


def backbone_norm(name: str) -> str:
    """Returns "batch" for ResNets and "layer" for ConvNeXts (the norm of their heads)."""
    return "batch" if _check_name(name) in _RESNETS else "layer"


def feature_dim(name: str) -> int:
    """Returns the channels C of the backbone's maps and pooled representation."""
    return stage_channels(name)[-1]


__all__ = [
    "ARCHITECTURES",
    "create_backbone",
    "with_output_stride",
    "abstract_backbone",
    "parameter_count",
    "backbone_stride",
    "backbone_norm",
    "feature_dim",
    "stage_channels",
    "ResNet",
    "ConvNeXt",
]
