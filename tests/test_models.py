"""Backbones, heads and VICRegLModel: registry, sizes, init, modes, dtypes, sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import assert_close, torch_no_grad
from tiny import grouped

from references.torch_modules import TORCH_BACKBONES, TorchResNet, nchw, numpy_state, randomize_torch_
from vicregl_jax import layout, models
from vicregl_jax.models import (
    ARCHITECTURES,
    backbone_norm,
    backbone_stride,
    create_backbone,
    feature_dim,
    parameter_count,
    stage_channels,
    with_output_stride,
)
from vicregl_jax.models.convnext import ConvNeXtBlock, DepthwiseConv
from vicregl_jax.models.layers import BatchNorm
from vicregl_jax.models.vicregl import VICRegLModel

# Backbone parameters (no classifier; ConvNeXt without layer scale, as the release trains).
PARAMETER_COUNTS = {
    "resnet18": 11_176_512,
    "resnet34": 21_284_672,
    "resnet50": 23_508_032,
    "resnet101": 42_500_160,
    "resnet152": 58_143_808,
    "resnet50x2": 93_907_072,
    "resnet50x4": 375_378_176,
    "resnet50x5": 586_450_240,
    "resnet200x2": 250_128_512,
    "resnet_test": 78_312,
    "convnext_tiny": 27_813_504,
    "convnext_small": 49_441_152,
    "convnext_base": 87_548_416,
    "convnext_large": 196_203_264,
    "convnext_xlarge": 348_111_872,
    "convnext_test": 61_872,
}
HEADS = dict(mlp="32-32-16", maps_mlp="24-24-8", num_classes=10)


@nnx.jit
def run(model, inputs):
    """model(inputs), compiled (eager dispatch is slow on this CPU); updates model's state."""
    return model(inputs)


# Two cores shared with XLA: one torch thread, so that its OpenMP threads do not spin
# against XLA's.
torch.set_num_threads(1)


no_torch_grad = pytest.fixture(autouse=True)(torch_no_grad)


def test_registry():
    assert set(ARCHITECTURES) == set(PARAMETER_COUNTS)
    for name in ARCHITECTURES:
        assert backbone_stride(name) == 32
        assert backbone_norm(name) == ("layer" if name.startswith("convnext") else "batch")
        assert feature_dim(name) == models.abstract_backbone(name).num_features
        assert stage_channels(name) == models.abstract_backbone(name).stage_channels
    assert feature_dim("resnet50") == 2048 and feature_dim("resnet50x4") == 8192
    assert stage_channels("resnet50") == (256, 512, 1024, 2048)
    assert stage_channels("convnext_small") == (96, 192, 384, 768)
    with pytest.raises(ValueError, match="'resnet51'.*resnet50, .*convnext_test"):
        create_backbone("resnet51", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="output_stride=8 for convnext_test: only ResNets"):
        create_backbone("convnext_test", output_stride=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="output_stride=4: use one of"):
        create_backbone("resnet_test", output_stride=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="alpha=1.5"):
        VICRegLModel(arch="resnet_test", alpha=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="drop_path_rate=0.1.*ConvNeXt"):
        VICRegLModel(arch="resnet_test", drop_path_rate=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'8192-x'"):
        VICRegLModel(arch="resnet_test", mlp="8192-x", rngs=nnx.Rngs(0))


def test_parameter_counts_match_the_release():
    assert abs(parameter_count("resnet50") - 23.5e6) < 0.05e6
    assert abs(parameter_count("convnext_small") - 49.5e6) < 0.1e6
    for name, count in PARAMETER_COUNTS.items():
        assert parameter_count(name) == count, name
        with torch.device("meta"):
            reference = TORCH_BACKBONES[name]()
        assert sum(p.numel() for p in reference.parameters()) == count, name


# ----------------------------------------------------------------- tiny real models


@pytest.fixture(scope="module")
def tiny():
    """Really initialised tiny VICRegL models (initialisation is slow on this CPU)."""
    out = {}
    for arch in ("resnet_test", "convnext_test"):
        make = nnx.jit(lambda arch=arch: VICRegLModel(arch=arch, **HEADS, rngs=nnx.Rngs(0)))
        out[arch] = make()
    return out


def test_initialisation(tiny):
    resnet = tiny["resnet_test"].backbone
    for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in stage:
            np.testing.assert_array_equal(block.bn2.scale[...], 0.0)  # zero-init residual
            np.testing.assert_array_equal(block.bn1.scale[...], 1.0)
    kernel = np.asarray(resnet.layer4[0].conv2.kernel[...])  # (3, 3, 64, 64)
    assert kernel.std() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)  # kaiming fan_out
    convnext = tiny["convnext_test"].backbone
    block = convnext.stages[3][0]
    assert np.asarray(block.pwconv1.kernel[...]).std() == pytest.approx(0.02, rel=0.05)
    np.testing.assert_array_equal(block.pwconv1.bias[...], 0.0)
    assert block.gamma is None
    linear = tiny["convnext_test"].expander.linears[0]  # torch.nn.Linear default init
    bound = 1 / math.sqrt(64)
    assert np.abs(linear.kernel[...]).max() <= bound
    assert np.asarray(linear.kernel[...]).std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert 0 < np.abs(linear.bias[...]).max() <= bound
    assert tiny["convnext_test"].expander.linears[-1].bias is None


@pytest.mark.parametrize("arch", ["resnet_test", "convnext_test"])
def test_bfloat16_compute(tiny, arch):
    model = tiny[arch]
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 64, 96, 3))
    maps, pooled = run(model.backbone, x)
    assert maps.shape == (2, 6, feature_dim(arch)) and pooled.shape == (2, feature_dim(arch))
    # Same weights, bfloat16 compute.
    half = nnx.eval_shape(lambda: VICRegLModel(arch=arch, dtype=jnp.bfloat16, **HEADS, rngs=nnx.Rngs(0)))
    nnx.update(half, nnx.state(model))
    half.eval()
    out32 = run(model, [x[:, None]])
    out16 = run(half, [x[:, None]])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(half, nnx.Param)))
    for key in ("maps", "representations", "embeddings", "local_embeddings"):
        a, b = out16[key][0], out32[key][0]
        assert a.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 0.05, key
    assert out16["logits"].dtype == jnp.float32
    model.train()


def test_batchnorm_matches_torch_in_train_and_eval_mode():
    x = np.random.default_rng(0).standard_normal((4, 5, 6, 3)).astype(np.float32) * 3 + 1
    bn = BatchNorm(3)
    ref = torch.nn.BatchNorm2d(3)  # momentum 0.1, eps 1e-5
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2))
    for step in range(2):  # running averages compound over steps as in PyTorch
        y = bn(jnp.asarray(x * (step + 1)))
        ty = ref(tx * (step + 1)).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(y, ty, atol=1e-5)
        np.testing.assert_allclose(bn.mean[...], ref.running_mean.numpy(), rtol=1e-5)
        np.testing.assert_allclose(bn.var[...], ref.running_var.numpy(), rtol=1e-5)  # unbiased
    bn.eval()
    ref.eval()
    np.testing.assert_allclose(bn(jnp.asarray(x)), ref(tx).numpy().transpose(0, 2, 3, 1), atol=1e-5)
    mean = np.asarray(bn.mean[...])
    bn(jnp.asarray(x))
    np.testing.assert_array_equal(bn.mean[...], mean)  # no update in eval mode


def test_drop_path_only_in_training():
    block = ConvNeXtBlock(8, drop_path_rate=0.5, layer_scale_init=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (32, 4, 4, 8))
    block.eval()
    kept = run(block, x)
    np.testing.assert_array_equal(run(block, x), kept)
    branch = kept - x
    block.train()
    y = run(block, x)
    dropped = np.all(np.isclose(y, x, atol=1e-6), axis=(1, 2, 3))
    scaled = np.all(np.isclose(y, x + 2 * branch, atol=1e-5), axis=(1, 2, 3))
    assert np.all(dropped | scaled) and 4 < dropped.sum() < 28  # whole samples, rate 0.5
    assert not np.array_equal(run(block, x), y)  # a new mask each call
    view = nnx.view(block, deterministic=True)
    np.testing.assert_array_equal(run(view, x), kept)
    rates = [
        b.drop_path.rate if b.drop_path else 0.0 for s in models.abstract_backbone("convnext_test").stages for b in s
    ]
    np.testing.assert_allclose(rates, [0.0, 0.1 / 3, 0.2 / 3, 0.1])  # linear over blocks


def test_depthwise_conv_implementations_agree():
    conv = DepthwiseConv(16, 7, dtype=jnp.float32, rngs=nnx.Rngs(0))
    conv.bias[...] = jax.random.normal(jax.random.key(1), (16,))
    x = jax.random.normal(jax.random.key(2), (2, 5, 6, 16))
    shifted = nnx.with_attributes(conv, implementation="shifted")

    def value_and_grads(module):
        loss = lambda m, x: jnp.sum(jnp.sin(m(x)))  # noqa: E731
        return nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(module, x)

    (a, (grad_a, gx_a)), (b, (grad_b, gx_b)) = value_and_grads(conv), value_and_grads(shifted)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(gx_a, gx_b, atol=1e-5)
    for u, v in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b)):
        np.testing.assert_allclose(u, v, atol=1e-4)


def test_vicregl_outputs_and_per_view_statistics(tiny):
    model = tiny["resnet_test"]
    model.train()
    a, b = (jax.random.normal(jax.random.key(i), (4, 64, 64, 3)) for i in range(2))
    small = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    state = nnx.clone(nnx.state(model))
    out = run(model, grouped([a, b, small]))
    assert [m.shape for m in out["maps"]] == [(4, 2, 4, 64), (4, 1, 1, 64)]
    assert [r.shape for r in out["representations"]] == [(4, 2, 64), (4, 1, 64)]
    assert [e.shape for e in out["embeddings"]] == [(4, 2, 16), (4, 1, 16)]
    assert [e.shape for e in out["local_embeddings"]] == [(4, 2, 4, 8), (4, 1, 1, 8)]
    assert out["logits"].shape == (4, 10)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
    # BatchNorm statistics per view: other data in view 1 leaves view 0's outputs alone.
    nnx.update(model, state)
    other = run(model, grouped([a, -b, small]))
    for key in ("embeddings", "local_embeddings", "maps"):
        np.testing.assert_allclose(other[key][0][:, 0], out[key][0][:, 0], atol=1e-5)
        assert not np.allclose(other[key][0][:, 1], out[key][0][:, 1])
    # ... and each view's statistics are its own: view 1 alone gives its outputs in the group.
    nnx.update(model, state)
    alone = run(model, [b[:, None]])
    nnx.update(model, state)
    np.testing.assert_allclose(alone["maps"][0][:, 0], out["maps"][0][:, 1], atol=1e-5)

    # The classifier sees stop_gradient(representations of view 0).
    grads = nnx.jit(nnx.grad(lambda m: m([a[:, None]])["logits"].sum()))(model)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["backbone"]))
    assert float(jnp.abs(grads["classifier"]["kernel"]).max()) > 0
    with pytest.raises(ValueError, match=r"views\[0\] has shape \(4, 64, 64, 3\).*one \(B, V, H, W, 3\) array"):
        model([a])


def test_layer_norm_models_batch_views_with_the_same_result(tiny):
    model = tiny["convnext_test"]
    model.eval()
    big, big2, small = (jax.random.normal(jax.random.key(i), (2, s, s, 3)) for i, s in enumerate((64, 64, 32)))
    together = run(model, grouped([big, big2, small]))  # the two large views run as one batch
    apart = run(model, [big[:, None], small[:, None], big2[:, None]])  # every view alone
    for (g, i), (h, j) in (((0, 0), (0, 0)), ((0, 1), (2, 0)), ((1, 0), (1, 0))):
        for key in ("maps", "embeddings", "local_embeddings"):
            np.testing.assert_allclose(together[key][g][:, i], apart[key][h][:, j], atol=1e-5)
    # The heads, run once on all views, give what they give on each view alone.
    np.testing.assert_allclose(
        model.expander(together["representations"][1][:, 0]), together["embeddings"][1][:, 0], atol=1e-5
    )
    np.testing.assert_allclose(
        model.local_projector(together["maps"][1][:, 0]), together["local_embeddings"][1][:, 0], atol=1e-5
    )
    model.train()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_drops_a_branch(alpha):
    model = nnx.eval_shape(lambda: VICRegLModel(arch="resnet_test", alpha=alpha, **HEADS, rngs=nnx.Rngs(0)))
    assert (model.expander is None) == (alpha == 0.0)
    assert (model.local_projector is None) == (alpha == 1.0)
    out = nnx.eval_shape(lambda m: m([jnp.zeros((2, 1, 64, 64, 3))]), model)
    assert (out["embeddings"] is None) == (alpha == 0.0)
    assert (out["local_embeddings"] is None) == (alpha == 1.0)


def test_batch_statistics_are_global_under_sharding(tiny):
    """jit over a batch sharded on 8 devices gives the one-device result: global stats."""
    model = tiny["resnet_test"]
    model.train()
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(3), (8, 1, 32, 32, 3))

    @jax.jit
    def step(state, x):
        m = nnx.merge(graphdef, state)
        out = m([x])
        return out["local_embeddings"][0], nnx.state(m)

    expected, expected_state = step(state, x)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
    got, got_state = step(state, sharded)
    assert len(got.sharding.device_set) == 8 or got.sharding.is_fully_replicated
    np.testing.assert_allclose(got, expected, atol=1e-5)
    stats = lambda s: jax.tree.leaves(nnx.state(nnx.merge(graphdef, s), nnx.BatchStat))  # noqa: E731
    for a, b in zip(stats(got_state), stats(expected_state)):
        np.testing.assert_allclose(a, b, atol=1e-6)


# ------------------------------------------------------------- dense prediction maps


@nnx.jit
def stages(model, x):
    return model.stage_maps(x)


# mmsegmentation's per-stage (strides, dilations) of the dilated ResNets.
DILATED = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2))}


@pytest.mark.parametrize("arch, output_stride", [("resnet50", 8), ("resnet_test", 16), ("resnet_test", 8)])
def test_dilated_resnet_matches_torch(arch, output_stride):
    """The dilated ResNet (same parameters, loaded from the release's layout) equals a PyTorch
    ResNet with mmsegmentation's strides and contracted dilations, at every stage."""
    block, sizes, width = models._RESNETS[arch]
    strides, dilations = DILATED[output_stride]
    reference = TorchResNet(block, sizes, width, strides=strides, dilations=dilations).eval()
    randomize_torch_(reference, seed=11)
    state_dict = numpy_state(reference)
    # Non-square input, so a swapped H/W shows.
    x = np.random.default_rng(12).standard_normal((2, 64, 96, 3)).astype(np.float32)
    expected = [t.numpy().transpose(0, 2, 3, 1) for t in reference.forward_stages(nchw(x))]

    # Into a plain ResNet, then dilated: the weights are shared, not copied.
    plain = nnx.eval_shape(lambda: create_backbone(arch, rngs=nnx.Rngs(0)))
    layout.load_torch_state_dict(plain, state_dict)
    plain.eval()
    dilated = with_output_stride(plain, output_stride)
    assert dilated.output_stride == output_stride and dilated.bn1.use_running_average
    assert dilated.layer4[0].conv1.kernel[...] is plain.layer4[0].conv1.kernel[...]
    got = stages(dilated, jnp.asarray(x))
    assert [g.shape[1:3] for g in got][-1] == (64 // output_stride, 96 // output_stride)
    for a, b in zip(got, expected):
        assert_close(a, b)
    # The release's file loads straight into a dilated ResNet too: same names and shapes.
    direct = nnx.eval_shape(lambda: create_backbone(arch, output_stride=output_stride, rngs=nnx.Rngs(0)))
    layout.load_torch_state_dict(direct, state_dict)
    direct.eval()
    assert_close(stages(direct, jnp.asarray(x))[-1], expected[-1])
    assert jax.tree.structure(nnx.state(direct)) == jax.tree.structure(nnx.state(plain))


def test_output_stride_map_sizes():
    image = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    for output_stride, last in ((8, 64), (16, 32), (32, 16)):
        model = nnx.eval_shape(
            lambda stride=output_stride: create_backbone("resnet50", output_stride=stride, rngs=nnx.Rngs(0))
        )
        shapes = [m.shape for m in nnx.eval_shape(lambda m, x: m.stage_maps(x), model, image)]
        assert shapes[0] == (1, 128, 128, 256) and shapes[-1] == (1, last, last, 2048)
    with pytest.raises(TypeError, match="needs a ResNet, got ConvNeXt"):
        with_output_stride(models.abstract_backbone("convnext_test"), 8)


def test_convnext_stage_maps_match_torch():
    """The 4 stage outputs, before the final LayerNorm, equal the PyTorch reference's."""
    reference = TORCH_BACKBONES["convnext_test"]().eval()
    randomize_torch_(reference, seed=13)
    # No drop path: its random stream would stay abstract (eval mode does not use it).
    model = nnx.eval_shape(lambda: create_backbone("convnext_test", drop_path_rate=0.0, rngs=nnx.Rngs(0)))
    layout.load_torch_state_dict(model, numpy_state(reference))
    model.eval()
    x = np.random.default_rng(14).standard_normal((2, 64, 96, 3)).astype(np.float32)
    got = stages(model, jnp.asarray(x))
    expected = [t.numpy().transpose(0, 2, 3, 1) for t in reference.forward_stages(nchw(x))]
    assert [g.shape[-1] for g in got] == list(stage_channels("convnext_test"))
    for a, b in zip(got, expected):
        assert_close(a, b)
