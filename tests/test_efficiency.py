"""Compile time, memory and collectives: blocks under a scan, rematerialisation, the LayerNorm
backward pass, the criterion's collectives and FSDP, each against the plain computation."""

import contextlib
import functools
import importlib.util
import io
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_losses import make_inputs
from tiny import grouped, tiny_config

from references import loss as ref
from references.torch_modules import TorchConvNeXt, TorchResNet, numpy_state, randomize_torch_
from vicregl_jax import build, layout, losses, optim, sharding, train
from vicregl_jax.checkpoint import abstract_like
from vicregl_jax.model_config import abstract_model, split_model
from vicregl_jax.models.convnext import ConvNeXt
from vicregl_jax.models.layers import layer_norm
from vicregl_jax.models.resnet import ResNet
from vicregl_jax.models.stack import BlockStack

torch.set_num_threads(1)

# Tiny backbones with a stage of several blocks: ConvNeXt stage 2 is a stack of 2 blocks; the
# ResNet's layer2 is a first block and a stack of 2.
CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64))
RESNET = dict(block="basic", stage_sizes=(1, 3, 1, 1), width=8)


def tiny_backbone(kind, *, scan=True, remat="none", seed=0):
    """A tiny backbone holding the random weights of the PyTorch reference (seed); its stacks
    run as loops (as on GPU / TPU) even on CPU."""
    if kind == "convnext":
        reference = TorchConvNeXt(CONVNEXT["depths"], CONVNEXT["dims"])
        model = nnx.eval_shape(
            lambda: ConvNeXt(**CONVNEXT, drop_path_rate=0.0, scan=scan, remat=remat, unroll=False, rngs=nnx.Rngs(0))
        )
    else:
        reference = TorchResNet(RESNET["block"], RESNET["stage_sizes"], RESNET["width"])
        model = nnx.eval_shape(lambda: ResNet(**RESNET, scan=scan, remat=remat, unroll=False, rngs=nnx.Rngs(0)))
    randomize_torch_(reference, seed=seed)
    layout.load_torch_state_dict(model, numpy_state(reference))
    return model, reference


def loss_and_grads(model, x):
    """Returns (loss, grads, model state after the call) of a train-mode forward + backward."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, rest, x):
        def loss(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            maps, pooled = m(x)
            return jnp.sum(jnp.sin(3 * maps)) + jnp.sum(jnp.square(pooled)), nnx.state(m)

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, grads, state

    return run(params, rest, x)


def unstacked(state):
    """{unrolled path: array} of a state whose stacked leaves are split into their blocks."""
    return {k: np.asarray(v) for k, v in layout._unstack(layout._flat_weights(state))[0].items()}


def assert_trees_close(a, b, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        scale = max(np.max(np.abs(b[k])), 1e-6)
        np.testing.assert_allclose(a[k], b[k], atol=rtol * scale, err_msg=str(k))


def residual_bytes(fn, *args) -> int:
    """Returns the bytes of the residuals jax keeps for fn's backward pass (arguments included)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    total = 0
    for dtype, dims in re.findall(r"^(\w+)\[([\d,]*)\]", out.getvalue(), flags=re.M):
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += size * jnp.dtype({"f32": "float32", "bf16": "bfloat16"}.get(dtype, "int32")).itemsize
    return total


@pytest.mark.parametrize("kind", ["convnext", "resnet"])
def test_scan_and_remat_equal_the_unrolled_model(kind):
    """Blocks under a scan (and each remat policy) give the unrolled model's values, gradients
    and BatchNorm updates; the release's layout loads into both alike; remat keeps less."""
    scanned, reference = tiny_backbone(kind, scan=True)
    unrolled, _ = tiny_backbone(kind, scan=False)
    stage = scanned.stages[2] if kind == "convnext" else scanned.layer2
    assert isinstance(stage[-1], BlockStack) and len(stage[-1]) == 2
    assert not any(isinstance(b, BlockStack) for b in (unrolled.stages[2] if kind == "convnext" else unrolled.layer2))
    assert_trees_close(unstacked(nnx.state(scanned)), unstacked(nnx.state(unrolled)), rtol=0)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    value, grads, state = loss_and_grads(unrolled, x)
    kept = {}
    for remat in ("none", "block", "dots"):
        model = scanned if remat == "none" else tiny_backbone(kind, remat=remat)[0]
        value_r, grads_r, state_r = loss_and_grads(model, x)
        np.testing.assert_allclose(value_r, value, rtol=1e-5, err_msg=remat)
        assert_trees_close(unstacked(grads_r), unstacked(grads))
        assert_trees_close(unstacked(state_r), unstacked(state))  # BatchNorm statistics updated alike
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x)[0])  # noqa: E731
        kept[remat] = residual_bytes(loss, params, x)
    assert kept["block"] < kept["dots"] < kept["none"], kept
    # And in eval mode the scanned model is the PyTorch reference.
    scanned.eval()
    reference.eval()
    maps, _ = nnx.jit(lambda m, x: m(x))(scanned, x)
    with torch.no_grad():
        expected = reference(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)))[0].numpy()
    np.testing.assert_allclose(maps, expected, atol=1e-4 * np.abs(expected).max())


def plain_layer_norm(x, scale, bias, epsilon, dtype):
    """The LayerNorm as automatic differentiation sees it: float32 statistics and rows."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    return (((x32 - mean) * jax.lax.rsqrt(var + epsilon)) * scale + bias).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_backward_equals_plain_and_keeps_the_input_dtype(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, (4, 6, 32)), dtype)
    scale, bias = (jnp.asarray(rng.normal(size=32), jnp.float32) for _ in range(2))
    weights = jnp.asarray(rng.normal(size=(4, 6, 32)), jnp.float32)

    def loss(norm, x, scale, bias):
        return jnp.sum(jnp.sin(norm(x, scale, bias, 1e-6, dtype).astype(jnp.float32)) * weights)

    custom = jax.jit(jax.value_and_grad(functools.partial(loss, layer_norm), argnums=(0, 1, 2)))
    plain = jax.jit(jax.value_and_grad(functools.partial(loss, plain_layer_norm), argnums=(0, 1, 2)))
    (v1, g1), (v2, g2) = custom(x, scale, bias), plain(x, scale, bias)
    rtol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(v1, v2, rtol=rtol)
    np.testing.assert_array_equal(
        layer_norm(x, scale, bias, 1e-6, dtype), plain_layer_norm(x, scale, bias, 1e-6, dtype)
    )
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=rtol * np.abs(b).max())
    # The backward pass keeps x as given plus 2 numbers per row, not float32 copies of x.
    kept = residual_bytes(lambda x: jnp.sum(layer_norm(x, scale, bias, 1e-6, dtype).astype(jnp.float32)), x)
    assert kept == x.size * x.dtype.itemsize + 2 * 4 * 24 + 4 * 32
    plain_kept = residual_bytes(lambda x: jnp.sum(plain_layer_norm(x, scale, bias, 1e-6, dtype).astype(jnp.float32)), x)
    assert plain_kept > 2 * x.size * 4


class AddOne(nnx.Module):
    """A block whose residual branch is 1 everywhere (to read drop-path masks off its output)."""

    def __init__(self, rngs):
        self.w = nnx.Param(jnp.ones(()))

    def __call__(self, x, drop_path=None):
        y = jnp.ones_like(x) * self.w[...]
        return x + (drop_path(y) if drop_path is not None else y)


def test_drop_path_rates_of_a_stack_are_per_block():
    rates = (0.0, 0.5, 0.75)  # branch outputs 1, 2 or 0, 4 or 0: their sum tells each mask
    stack = BlockStack(AddOne, 3, rngs=nnx.Rngs(0), drop_path_rates=rates, unroll=False)
    run = nnx.jit(lambda s, x: s(x))
    out = np.asarray(run(stack, jnp.zeros((4000, 1, 1, 1)))).ravel()
    assert set(np.round(out, 5)) <= {1.0, 3.0, 5.0, 7.0}
    kept = np.stack([np.ones_like(out), np.isin(out, (3.0, 7.0)), out >= 5.0])
    np.testing.assert_allclose(kept.mean(1), [1.0, 0.5, 0.25], atol=0.03)
    assert not np.array_equal(np.asarray(run(stack, jnp.zeros((4000, 1, 1, 1)))).ravel(), out)  # new masks
    stack.eval()
    np.testing.assert_array_equal(run(stack, jnp.zeros((8, 1, 1, 1))), 3.0)
    # ConvNeXt's stacks get their slice of the rates, linear over all blocks.
    convnext = nnx.eval_shape(
        lambda: ConvNeXt(depths=(1, 1, 3, 2), dims=CONVNEXT["dims"], drop_path_rate=0.1, rngs=nnx.Rngs(0))
    )
    np.testing.assert_allclose(convnext.stages[2][0].rates, np.linspace(0, 0.1, 7)[2:5])
    np.testing.assert_allclose(convnext.stages[3][0].rates, np.linspace(0, 0.1, 7)[5:])
    assert convnext.stages[1][0].drop_path.rate == pytest.approx(0.1 / 6)


@pytest.mark.parametrize("name", ["lars", "adamw"])
def test_optimisers_treat_each_block_of_a_stack_as_its_own_parameter(name):
    rng = np.random.default_rng(2)
    blocks = [
        {
            "kernel": (rng.normal(size=(4, 5)) * (b + 1)).astype(np.float32),
            "bias": rng.normal(size=5).astype(np.float32),
        }
        for b in range(3)
    ]
    unrolled = {str(b): blocks[b] for b in range(3)}
    stacked = {sharding.STACKED: jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
    grads = [
        {"kernel": rng.normal(size=(4, 5)).astype(np.float32), "bias": rng.normal(size=5).astype(np.float32)}
        for _ in range(3)
    ]
    tx = optim.make_optimizer(name, 0.1, weight_decay=0.01)

    def two_steps(params, grads):
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    a = two_steps(unrolled, {str(b): grads[b] for b in range(3)})
    b = two_steps(stacked, {sharding.STACKED: jax.tree.map(lambda *xs: np.stack(xs), *grads)})
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(np.stack([a[str(i)][k] for i in range(3)]), b[sharding.STACKED][k], rtol=1e-6)
    assert optim.matrix_mask(stacked)[sharding.STACKED] == {"kernel": True, "bias": False}


def test_fsdp_never_splits_the_block_axis():
    mesh = sharding.make_mesh()
    tree = {
        "stacked": {"kernel": jax.ShapeDtypeStruct((32, 8, 16), jnp.float32)},
        "plain": {"kernel": jax.ShapeDtypeStruct((32, 8, 16), jnp.float32)},
    }
    specs = sharding.param_shardings(tree, mesh, "fsdp", min_size=0)
    assert specs["stacked"]["kernel"].spec == P(None, None, "data")
    assert specs["plain"]["kernel"].spec == P("data", None, None)


# --------------------------------------------------------------------- the criterion


def on_mesh(fn):
    mesh = sharding.make_mesh()

    def traced(*args):
        with sharding.step_context(mesh):
            return fn(*args)

    shard = lambda xs: [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]  # noqa: E731
    return jax.jit(traced), shard


@pytest.mark.parametrize(
    "grid_sizes,local_dim,kwargs",
    [
        ((5, 5, 3, 3), 32, dict(num_matches=(9, 4))),  # statistics spread over devices by locations
        ((5, 5), 16, dict(l2_all_matches=False, num_matches=(9, 4))),  # the global ones by channels
    ],
)
def test_criterion_with_explicit_collectives_equals_reference_and_plain(grid_sizes, local_dim, kwargs):
    emb, maps, grids = make_inputs(5, batch=16, grid_sizes=grid_sizes, local_dim=local_dim, dim=64)
    cfg = losses.LossConfig(**kwargs)

    def total(e, m):
        return losses.vicregl_loss(grouped(e), grouped(m), grouped(grids), cfg)

    plain = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
    collective, shard = on_mesh(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
    (_, terms), grads = plain(emb, maps)
    (_, s_terms), s_grads = collective(shard(emb), shard(maps))
    _, want = ref.total(
        emb,
        maps,
        grids,
        alpha=cfg.alpha,
        num_matches=cfg.num_matches,
        l2_all_matches=cfg.l2_all_matches,
        fast_vc_reg=cfg.fast_vc_reg,
    )
    for k, v in want.items():
        np.testing.assert_allclose(float(s_terms[k]), v, rtol=1e-5, err_msg=k)
        np.testing.assert_allclose(float(terms[k]), v, rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, atol=1e-6 * np.abs(b).max() + 1e-9)


@pytest.mark.parametrize("shape", [(16, 5, 64), (16, 2, 64), (16, 12, 6)])
def test_batch_statistics_by_locations_and_by_channels(shape):
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    x[:, :, 1] += 0.8 * x[:, :, 0]
    plain = losses._statistics(jnp.asarray(x))
    for route in (lambda x: losses._by_locations(x, 8), losses._by_channels):
        if shape[-1] % 8 and route is losses._by_channels:
            continue
        run, shard = on_mesh(route)
        got = run(*shard([x]))
        for a, b in zip(got, plain):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    want = [ref.var_term(x[:, k : k + 1].astype(np.float64)) * shape[-1] for k in range(shape[1])]
    np.testing.assert_allclose(plain[0], want, rtol=1e-5)


# ------------------------------------------------------------------------------ FSDP


def hlo_tools():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "common.py")
    spec = importlib.util.spec_from_file_location("vicregl_benchmarks_common", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_fsdp_step_gathers_weights_only_and_reduce_scatters_their_gradients():
    """The ConvNeXt test model's FSDP train step on 8 devices: every all-gather is of a sharded
    weight (in the compute dtype), no activation is all-gathered or all-reduced across the
    batch, and every sharded weight's gradient is reduce-scattered, never all-reduced."""
    config = tiny_config(
        "unused",
        {
            "model.arch": "convnext_test",
            "data.crops": ((32, 2, 0.3, 1.0),),
            "loss.num_matches": (1, 1),
            "optim.name": "adamw",
        },
    )
    mesh = sharding.make_mesh()
    schedule, tx = build.make_optimizer(config, 10, 100)
    graphdef, streams, state, _ = build.init_train_state(config, tx, mesh)
    shardings = sharding.param_shardings(abstract_like(state), mesh, "fsdp", min_size=2**10)
    sharded = {
        tuple(x.shape): s.spec
        for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params))
        if any(s.spec)
    }
    # XLA all-reduces some gradients reshaped (bias (64,) as (1, 1, 64)) or transposed.
    squeeze = lambda shape: tuple(sorted(d for d in shape if d != 1))  # noqa: E731
    replicated = {
        squeeze(x.shape)
        for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params))
        if not any(s.spec)
    }
    assert len(sharded) >= 8
    step = train.jit_train_step(
        train.make_train_step(graphdef, streams, tx, schedule, build.loss_config(config)), shardings, mesh
    )
    batch_size = config.batch_size
    rng = np.random.default_rng(0)
    batch = {
        "views": (rng.normal(size=(batch_size, 2, 32, 32, 3)).astype(np.float32),),
        "grids": (rng.uniform(0, 100, size=(batch_size, 2, 1, 1, 2)).astype(np.float32),),
        "label": np.zeros(batch_size, np.int32),
    }
    lowered = step.lower(jax.device_put(state, shardings), batch)
    collectives = hlo_tools().collectives(lowered.compile().as_text())

    def local(shape, spec):
        return tuple(d // 8 if name else d for d, name in zip(shape, tuple(spec) + (None,) * len(shape)))

    gathered = [c for c in collectives if c.kind == "all-gather"]
    weights = [c for c in gathered if c.shape in sharded]
    assert {c.shape for c in weights} == set(sharded)
    for c in gathered:  # the rest: 1-D vectors of per-location statistics of the criterion
        assert c.shape in sharded or len(c.shape) == 1, c
    for c in collectives:
        if c.kind == "all-reduce":  # gradients of replicated parameters, statistics, metrics
            statistic = "criterion" in c.op_name and "psum" in c.op_name  # e.g. summed Gram matrices
            assert squeeze(c.shape) in replicated or len(c.shape) <= 1 or statistic, c
            assert c.shape not in sharded, c
        assert c.kind != "all-gather" or len(c.shape) != 4 or c.shape in sharded, c  # no NHWC map
    scattered = {c.shape for c in collectives if c.kind == "reduce-scatter"}
    assert scattered == {local(shape, spec) for shape, spec in sharded.items()}
    # The weights are gathered in the compute dtype (XLA:CPU computes bfloat16 in float32, so the
    # compiled program cannot show it: the lowered one can).
    config.model.dtype = "bfloat16"
    graphdef16 = split_model(abstract_model(config.model, config.loss.alpha, config.seed))[0]
    step16 = train.jit_train_step(
        train.make_train_step(graphdef16, streams, tx, schedule, build.loss_config(config)), shardings, mesh
    )
    text = step16.lower(jax.device_put(state, shardings), batch).as_text()
    gathers = re.findall(r"all_gather.*?-> tensor<[\dx]*x(\w+)>", text)
    assert gathers and set(gathers) == {"bf16"}


# ------------------------------------------------------------- the PyTorch reference step


@pytest.mark.parametrize("kwargs", [dict(), dict(l2_all_matches=False, alpha=0.9)])
def test_torch_criterion_of_the_reference_step_equals_the_reference(kwargs):
    """The PyTorch criterion benchmarks/torch_step_bench.py times equals the numpy reference criterion."""
    from references.torch_modules import torch_vicregl_loss

    emb, maps, grids = make_inputs(7, grid_sizes=(7, 7, 3, 3))
    as_torch = lambda xs: [torch.from_numpy(np.asarray(x, np.float64)) for x in xs]  # noqa: E731
    flat_grids = [g.reshape(g.shape[0], -1, 2) for g in grids]
    total, terms = torch_vicregl_loss(as_torch(emb), as_torch(maps), as_torch(flat_grids), **kwargs)
    want_total, want = ref.total(emb, maps, grids, **kwargs)
    for k, v in want.items():
        np.testing.assert_allclose(float(terms[k]), v, rtol=1e-9, err_msg=k)
    np.testing.assert_allclose(float(total), want_total, rtol=1e-9)
