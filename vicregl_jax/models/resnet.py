"""ResNets of the release (torchvision v1.5 layout): 18 to 152, wide 50x2/x4/x5, 200x2.

Attribute names mirror torchvision's state_dict names (``conv1``, ``bn1``,
``layer{1..4}.{b}.{conv1,bn1,...}``, ``downsample.{0,1}``), so that conversion to and
from the release (vicregl_jax/layout.py) is a renaming of leaves plus transposes. The
blocks after the first of a stage, when there are 2 or more, are one BlockStack
(``layer{i}.1.stacked.*`` with a leading block axis, run by a scan).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vicregl_jax import sharding
from vicregl_jax.models.layers import BatchNorm, kaiming_normal_fan_out, max_pool_3x3_s2
from vicregl_jax.models.stack import check_remat, run_stage, stage_blocks


def _conv(
    in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, *, dtype, rngs: nnx.Rngs, dilation: int = 1
) -> nnx.Conv:
    """Returns a bias-free conv with explicit symmetric padding, as PyTorch pads."""
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=(dilation, dilation),
        use_bias=False,
        kernel_init=kaiming_normal_fan_out,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=sharding.gathered_conv_general_dilated,
        rngs=rngs,
    )


def _conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, *, dtype, rngs, dilation: int = 1, zero_init=False
) -> tuple[nnx.Conv, BatchNorm]:
    """Returns a bias-free conv (see _conv) and the BatchNorm after it (scale starting at 0 with zero_init)."""
    conv = _conv(in_ch, out_ch, kernel, stride, padding, dilation=dilation, dtype=dtype, rngs=rngs)
    return conv, BatchNorm(out_ch, zero_init_scale=zero_init, dtype=dtype)


def _downsample(in_ch: int, out_ch: int, stride: int, *, dtype, rngs) -> nnx.List | None:
    """Returns the projection shortcut [1x1 conv, BatchNorm], or None for identity."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nnx.List([_conv(in_ch, out_ch, 1, stride, 0, dtype=dtype, rngs=rngs), BatchNorm(out_ch, dtype=dtype)])


def _shortcut(downsample: nnx.List | None, x: jax.Array) -> jax.Array:
    if downsample is None:
        return x
    conv, bn = downsample
    return bn(conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 convs; the residual branch's last BatchNorm scale starts at 0.

    dilation applies to the first 3x3 conv only (mmsegmentation's dilated BasicBlock;
    torchvision has none).
    """

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, *, dilation: int = 1, dtype, rngs: nnx.Rngs):
        self.conv1, self.bn1 = _conv_bn(in_ch, planes, 3, stride, dilation, dilation=dilation, dtype=dtype, rngs=rngs)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, 1, 1, zero_init=True, dtype=dtype, rngs=rngs)
        self.downsample = _downsample(in_ch, planes, stride, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns relu(x's shortcut + the residual branch)."""
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
    """1x1, 3x3 (carrying the stride and dilation: v1.5), 1x1 x4; last BatchNorm scale 0."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, *, dilation: int = 1, dtype, rngs: nnx.Rngs):
        out_ch = planes * self.expansion
        self.conv1, self.bn1 = _conv_bn(in_ch, planes, 1, 1, 0, dtype=dtype, rngs=rngs)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride, dilation, dilation=dilation, dtype=dtype, rngs=rngs)
        self.conv3, self.bn3 = _conv_bn(planes, out_ch, 1, 1, 0, zero_init=True, dtype=dtype, rngs=rngs)
        self.downsample = _downsample(in_ch, out_ch, stride, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns relu(x's shortcut + the residual branch)."""
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + _shortcut(self.downsample, x))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


OUTPUT_STRIDES = (8, 16, 32)


def stage_strides_and_dilations(output_stride: int) -> list[tuple[int, int, int]]:
    """Returns (stride, first block's dilation, other blocks' dilation) of the 4 stages.

    Stages 2-4 halve the resolution until the total stride reaches output_stride; past it a
    stage keeps the resolution and doubles the dilation of its 3x3 convs instead, its first
    block at half the new dilation ("contract dilation", as mmsegmentation's dilated
    ResNets: output stride 8 is strides 1, 2, 1, 1 and dilations 1, 1, 2, 4).
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride={output_stride}: use one of {OUTPUT_STRIDES}")
    total, dilation, out = 4, 1, []  # the stem and max-pool give stride 4
    for i in range(4):
        if i == 0:
            out.append((1, 1, 1))
        elif total < output_stride:
            total *= 2
            out.append((2, dilation, dilation))
        else:
            dilation *= 2
            out.append((1, dilation // 2, dilation))
    return out


class ResNet(nnx.Module):
    """ResNet backbone: NHWC images -> (maps (B, h*w, C), pooled (B, C)), both float32.

    Args:
      block: "basic" or "bottleneck".
      stage_sizes: blocks per stage (4 stages, total stride 32).
      width: channels of the stem and of the first stage's 3x3 convs (64 * widen).
      output_stride: 32, or 16 / 8 for the dilated variants of dense prediction (same
        parameters, see stage_strides_and_dilations).
      dtype: compute dtype (parameters and BatchNorm statistics stay float32).
      remat: rematerialisation per block, "dots" (default) | "block" | "none" (models/stack.py).
      scan: run the blocks after the first of a stage as one scan (BlockStack); False
        unrolls them (same function, other parameter tree; for comparisons).
      unroll: run the scans unrolled (same parameters); None: on CPU only (models/stack.py).
    """

    def __init__(
        self,
        *,
        block: str,
        stage_sizes: Sequence[int],
        width: int = 64,
        output_stride: int = 32,
        dtype=jnp.float32,
        remat: str = "dots",
        scan: bool = True,
        unroll: bool | None = None,
        rngs: nnx.Rngs,
    ):
        if block not in BLOCKS:
            raise ValueError(f"block={block!r}: use one of {sorted(BLOCKS)}")
        if len(stage_sizes) != 4:
            raise ValueError(f"stage_sizes={tuple(stage_sizes)}: give 4 stage sizes")
        schedule = stage_strides_and_dilations(output_stride)
        block_cls = BLOCKS[block]
        self.block = block
        self.stage_sizes = tuple(stage_sizes)
        self.width = width
        self.output_stride = output_stride
        self.dtype = dtype
        self.remat = check_remat(remat)
        self.scan = scan
        self.unroll = unroll
        self.conv1 = _conv(3, width, 7, 2, 3, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(width, dtype=dtype)
        in_ch = width
        stage_channels = []
        for i, (num_blocks, (stride, first_dilation, dilation)) in enumerate(zip(stage_sizes, schedule)):
            planes = width * 2**i
            blocks = [block_cls(in_ch, planes, stride, dilation=first_dilation, dtype=dtype, rngs=rngs)]
            in_ch = planes * block_cls.expansion

            def make_block(rngs, rate, in_ch=in_ch, planes=planes, dilation=dilation):
                return block_cls(in_ch, planes, 1, dilation=dilation, dtype=dtype, rngs=rngs)

            blocks += stage_blocks(make_block, num_blocks, first=1, rngs=rngs, scan=scan, remat=remat, unroll=unroll)
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
            stage_channels.append(in_ch)
        self.stage_channels = tuple(stage_channels)
        self.num_features = in_ch

    def stage_maps(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Returns the 4 stages' outputs, NHWC in the compute dtype (strides 4, 8, 16, 32
        or less when dilated)."""
        x = x.astype(self.dtype)
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = sharding.constrain_batch(max_pool_3x3_s2(x))
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = run_stage(stage, x, self.remat)
            outputs.append(x)
        return tuple(outputs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.stage_maps(x)[-1]
        b, h, w, c = x.shape
        maps = x.reshape(b, h * w, c).astype(jnp.float32)
        return maps, jnp.mean(maps, axis=1)
