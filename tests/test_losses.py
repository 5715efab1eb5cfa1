"""The criterion against the independent NumPy reference, its gradients, sharding and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import grouped

from references import loss as ref
from vicregl_jax import losses, matching, metrics
from vicregl_jax.losses import LossConfig

RTOL = 1e-5


def crop_grid(rng, n, image=(375.0, 500.0)):
    """A location grid (n, n, 2) of a random crop, by the release's formula (cell centres in image pixels)."""
    H, W = image
    h, w = rng.uniform(0.2, 1.0) * H, rng.uniform(0.2, 1.0) * W
    i, j = rng.uniform(0, H - h), rng.uniform(0, W - w)
    rows = i + (np.arange(n) + 0.5) * h / n
    cols = j + (np.arange(n) + 0.5) * w / n
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1)


def make_inputs(seed, batch=8, grid_sizes=(7, 7), dim=64, local_dim=32, dtype=np.float32):
    """Random embeddings, local embeddings and crop grids for views of the given grid sizes,
    one array per view (the reference's layout; `grouped` gives the criterion's)."""
    rng = np.random.default_rng(seed)
    v = len(grid_sizes)
    base = rng.normal(size=(batch, dim))
    # Views share a component so the invariance term is not all noise.
    emb = [(base + 0.7 * rng.normal(size=(batch, dim))).astype(dtype) for _ in range(v)]
    maps = [rng.normal(size=(batch, n * n, local_dim)).astype(dtype) for n in grid_sizes]
    grids = [np.stack([crop_grid(rng, n) for _ in range(batch)]).astype(np.float32) for n in grid_sizes]
    return emb, maps, grids


@functools.cache
def jitted(cfg):
    """The criterion, jitted, on per-view lists (grouped here)."""
    loss = jax.jit(lambda e, m, g: losses.vicregl_loss(e, m, g, cfg))
    return lambda e, m, g: loss(grouped(e), grouped(m), grouped(g))


def assert_terms_close(got, want, rtol=RTOL):
    for name, value in want.items():
        np.testing.assert_allclose(float(got[name]), value, rtol=rtol, atol=1e-6, err_msg=name)


CASES = [
    # (grid sizes, cfg kwargs)
    ((7, 7), dict()),
    ((7, 7), dict(l2_all_matches=False)),
    ((7, 7), dict(num_matches=(49, 49))),
    ((7, 7), dict(num_matches=(1, 1), alpha=0.0)),
    ((7, 7), dict(alpha=1.0)),
    ((7, 7), dict(fast_vc_reg=True)),
    ((7, 7) + (3,) * 6, dict()),
    ((7, 7) + (3,) * 6, dict(num_matches=(49, 9), l2_all_matches=False)),
    ((7, 7) + (3,) * 6, dict(num_matches=(1, 1))),
    ((7, 7) + (3,) * 6, dict(num_matches=(20, 4), l2_all_matches=False, alpha=0.0)),
    ((7, 7) + (3,) * 6, dict(fast_vc_reg=True, num_matches=(49, 9))),
]


@pytest.mark.parametrize("grid_sizes,kwargs", CASES)
def test_matches_numpy_reference(grid_sizes, kwargs):
    cfg = LossConfig(**kwargs)
    emb, maps, grids = make_inputs(0, grid_sizes=grid_sizes)
    total, terms = jitted(cfg)(emb, maps, grids)
    want_total, want = ref.total(
        emb,
        maps,
        grids,
        alpha=cfg.alpha,
        num_matches=cfg.num_matches,
        l2_all_matches=cfg.l2_all_matches,
        fast_vc_reg=cfg.fast_vc_reg,
    )
    assert_terms_close(terms, want)
    np.testing.assert_allclose(float(total), want_total, rtol=RTOL)
    # Terms of a branch that alpha turns off are reported as 0.
    if cfg.alpha == 1.0:
        assert float(terms["local_inv"]) == 0.0
    if cfg.alpha == 0.0:
        assert float(terms["global_cov"]) == 0.0


@pytest.mark.parametrize("batch,dim", [(40, 16), (8, 64), (16, 16)])
def test_covariance_both_gram_paths(batch, dim):
    """The B x B Gram path (B < D) and the D x D path give the reference's cov term."""
    x = np.random.default_rng(1).normal(size=(batch, 5, dim)).astype(np.float32)
    x[:, :, 1] += 0.8 * x[:, :, 0]  # real off-diagonal structure
    got = float(jax.jit(losses.covariance_term)(x))
    np.testing.assert_allclose(got, ref.cov_term(x.astype(np.float64)), rtol=RTOL)
    np.testing.assert_allclose(float(losses.variance_term(x)), ref.var_term(x.astype(np.float64)), rtol=RTOL)


def test_matching_keeps_original_order_and_nearest():
    """By hand: kept locations are the k smallest nearest-distances, in original order."""
    d = jnp.array([[5.0, 1.0, 9.0], [0.5, 3.0, 2.0], [7.0, 8.0, 6.0], [4.0, 0.2, 3.0]])
    kept, partner = matching.nearest_matches(d, 2)
    np.testing.assert_array_equal(kept, [1, 3])  # nearest distances 1.0, 0.5, 6.0, 0.2
    np.testing.assert_array_equal(partner, [0, 1])
    kept, partner = matching.nearest_matches(d, 4)
    np.testing.assert_array_equal(kept, [0, 1, 2, 3])
    np.testing.assert_array_equal(partner, [1, 0, 2, 1])
    # Ties go to the lower index, for the nearest candidate and for the ranking.
    kept, partner = matching.nearest_matches(jnp.array([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]]), 2)
    np.testing.assert_array_equal(kept, [1, 2])
    np.testing.assert_array_equal(partner, [1, 0])
    kept, _ = matching.nearest_matches(jnp.zeros((4, 4)), 2)
    np.testing.assert_array_equal(kept, [0, 1])


def test_same_views_in_other_groupings_give_the_same_terms():
    """Views 2.. grouped into one (B, 6, ...) array or given as six groups of one: the vmap over a
    group's view axis computes what separate groups do."""
    emb, maps, grids = make_inputs(12, grid_sizes=(7, 7) + (3,) * 6)
    cfg = LossConfig(num_matches=(20, 4), l2_all_matches=False)
    loss = jax.jit(lambda e, m, g: losses.vicregl_loss(e, m, g, cfg)[1])
    apart = lambda xs: grouped(xs[:2]) + [x[:, None] for x in xs[2:]]  # noqa: E731
    together = loss(grouped(emb), grouped(maps), grouped(grids))
    separate = loss(apart(emb), apart(maps), apart(grids))
    assert_terms_close(separate, {k: float(v) for k, v in together.items()})


def test_identical_views_have_zero_invariance():
    emb, maps, grids = make_inputs(2)
    emb = [emb[0], emb[0]]
    maps = [maps[0], maps[0]]
    grids = [grids[0], grids[0]]
    _, terms = jitted(LossConfig())(emb, maps, grids)
    assert float(terms["global_inv"]) == 0.0
    assert float(terms["local_inv"]) < 1e-6


def test_bfloat16_inputs_give_float32_statistics():
    emb, maps, grids = make_inputs(3)
    total32, terms32 = jitted(LossConfig())(emb, maps, grids)
    as_bf16 = lambda xs: [jnp.asarray(x, jnp.bfloat16) for x in xs]  # noqa: E731
    emb16, maps16 = as_bf16(emb), as_bf16(maps)
    total16, terms16 = jitted(LossConfig())(emb16, maps16, grids)
    assert total16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in terms16.values())
    # Same result as float32 statistics of the bfloat16-rounded inputs.
    rounded = lambda xs: [np.asarray(x, np.float32) for x in xs]  # noqa: E731
    want, _ = jitted(LossConfig())(rounded(emb16), rounded(maps16), grids)
    np.testing.assert_allclose(float(total16), float(want), rtol=RTOL)
    np.testing.assert_allclose(float(total16), float(total32), rtol=2e-2)


def test_gradient_matches_finite_differences():
    """jax.grad of the total against central differences, in float64 on a tie-free case."""
    with jax.enable_x64(True):
        emb, maps, grids = make_inputs(4, batch=4, grid_sizes=(3, 3, 2), dim=6, local_dim=5, dtype=np.float64)
        cfg = LossConfig(num_matches=(4, 2), l2_all_matches=False)
        grids = [g.astype(np.float64) for g in grids]

        def f(emb, maps):
            return losses.vicregl_loss(grouped(emb), grouped(maps), grouped(grids), cfg)[0]

        g_emb, g_maps = jax.jit(jax.grad(f, argnums=(0, 1)))(emb, maps)
        rng = np.random.default_rng(0)
        f_jit = jax.jit(f)
        for _ in range(4):  # directional derivatives along random directions
            de = [rng.normal(size=e.shape) for e in emb]
            dm = [rng.normal(size=m.shape) for m in maps]
            eps = 1e-6
            plus = f_jit([e + eps * d for e, d in zip(emb, de)], [m + eps * d for m, d in zip(maps, dm)])
            minus = f_jit([e - eps * d for e, d in zip(emb, de)], [m - eps * d for m, d in zip(maps, dm)])
            fd = (float(plus) - float(minus)) / (2 * eps)
            analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(list(g_emb) + list(g_maps), de + dm))
            np.testing.assert_allclose(analytic, fd, rtol=1e-6)
        # The gradient reaches every view, the small one included.
        assert all(float(jnp.abs(g).sum()) > 0 for g in list(g_emb) + list(g_maps))


@pytest.mark.parametrize("axis_type,local_dim", [("explicit", 32), ("auto", 8)])
def test_sharded_equals_unsharded(axis_type, local_dim):
    """On global arrays sharded over 8 devices, the statistics are over the global batch.

    Both mesh axis types, and both covariance paths (local_dim 32 > B: Gram; 8 < B: D x D).
    """
    assert jax.device_count() == 8
    axis_types = (getattr(jax.sharding.AxisType, axis_type.capitalize()),)
    mesh = jax.make_mesh((8,), ("data",), axis_types=axis_types)
    emb, maps, grids = make_inputs(5, batch=16, grid_sizes=(7, 7, 3, 3), local_dim=local_dim)
    cfg = LossConfig(l2_all_matches=False)
    f = jax.jit(
        lambda e, m, g: losses.vicregl_loss(grouped(e), grouped(m), grouped(g), cfg),
        out_shardings=NamedSharding(mesh, P()),
    )
    total, terms = f(emb, maps, grids)
    shard = lambda xs: [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]  # noqa: E731
    s_emb, s_maps, s_grids = shard(emb), shard(maps), shard(grids)
    assert len(s_emb[0].sharding.device_set) == 8
    s_total, s_terms = f(s_emb, s_maps, s_grids)
    for k in terms:
        np.testing.assert_allclose(float(s_terms[k]), float(terms[k]), rtol=RTOL, err_msg=k)
    # And the per-shard statistics would differ: the test can tell global from local.
    local_cov = losses.covariance_term(emb[0][:2])
    assert abs(float(local_cov) - float(losses.covariance_term(emb[0]))) > 1e-3


def test_classifier_terms_and_unlabelled():
    logits = jnp.array([[5.0, 0, 0, 0, 0, 0], [0, 5.0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 5.0], [1.0, 0, 0, 0, 0, 0]])
    labels = jnp.array([0, 2, 5, -1])
    out = metrics.classifier_terms(logits, labels)
    assert float(out["top1"]) == pytest.approx(200 / 3)
    assert float(out["top5"]) == pytest.approx(100.0)
    log_p = jax.nn.log_softmax(logits)
    want = -(log_p[0, 0] + log_p[1, 2] + log_p[2, 5]) / 3
    assert float(out["cls_loss"]) == pytest.approx(float(want), rel=1e-6)
    emb, maps, grids = make_inputs(6, batch=4)
    f = jax.jit(
        lambda e, m, g, lo, la: losses.vicregl_loss(
            grouped(e), grouped(m), grouped(g), LossConfig(), logits=lo, labels=la
        )
    )
    total, terms = f(emb, maps, grids, logits, labels)
    np.testing.assert_allclose(float(total), float(terms["vicreg"] + terms["cls_loss"]), rtol=1e-6)


def test_collapse_metrics():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(256, 32)).astype(np.float32)
    m = metrics.collapse_metrics(x, x)
    # Isotropic vectors: std of normalised coordinates about 1/sqrt(D); correlations about 0.
    assert abs(float(m["stdr"]) - 1 / np.sqrt(32)) < 0.02
    assert abs(float(m["corr"])) < 0.01
    # Reference off-diagonal mean of the correlation matrix, formed explicitly.
    z = (x - x.mean(0)) / (x.std(0, ddof=1) + 1e-5)
    c = z.T @ z / (len(x) - 1)
    np.testing.assert_allclose(float(m["core"]), (c.sum() - np.trace(c)) / (32 * 31), atol=1e-6)
    collapsed = np.tile(x[:1], (256, 1)) + 1e-6 * x
    m = metrics.collapse_metrics(collapsed, collapsed)
    assert float(m["stde"]) < 1e-5


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_too_many_matches_is_named():
    emb, maps, grids = map(grouped, make_inputs(8, grid_sizes=(7, 7, 3)))
    with pytest.raises(ValueError, match=r"num_matches=\(20, 10\).*at most \(49, 9\)"):
        losses.vicregl_loss(emb, maps, grids, LossConfig(num_matches=(20, 10)))
    with pytest.raises(ValueError, match=r"num_matches=\(50, 4\)"):
        losses.vicregl_loss(emb, maps, grids, LossConfig(num_matches=(50, 4)))


def test_batch_of_one_is_named():
    emb, maps, grids = map(grouped, make_inputs(9, batch=1))
    with pytest.raises(ValueError, match="batch of 1.*at least 2"):
        losses.vicregl_loss(emb, maps, grids, LossConfig())
    with pytest.raises(ValueError, match="batch of 1"):
        losses.vicregl_loss(None, maps, grids, LossConfig(alpha=0.0))


def test_mismatched_views_are_named():
    emb, maps, grids = make_inputs(10, grid_sizes=(7, 7, 3))
    with pytest.raises(ValueError, match=r"share batch and channel sizes.*\(8, 2, 64\).*\(4, 1, 64\)"):
        losses.vicregl_loss(grouped(emb[:2]) + [emb[2][:4, None]], grouped(maps), grouped(grids), LossConfig())
    with pytest.raises(ValueError, match=r"share batch and channel sizes.*\(8, 2, 49, 32\).*\(8, 1, 9, 16\)"):
        losses.vicregl_loss(grouped(emb), grouped(maps[:2]) + [maps[2][:, None, :, :16]], grouped(grids), LossConfig())


def test_grid_not_matching_map_is_named():
    emb, maps, grids = map(grouped, make_inputs(11))
    bad = [grids[0][:, :, :6, :6]]
    with pytest.raises(ValueError, match=r"Group 0: grids of shape \(8, 2, 36, 2\).*\(8, 2, 49, 32\)"):
        losses.vicregl_loss(emb, maps, bad, LossConfig())
    with pytest.raises(ValueError, match=r"two large views in the first group"):
        losses.vicregl_loss(
            None, [maps[0][:, :1], maps[0][:, 1:]], [grids[0][:, :1], grids[0][:, 1:]], LossConfig(alpha=0.0)
        )


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="alpha=1.5"):
        LossConfig(alpha=1.5)
    with pytest.raises(ValueError, match=r"num_matches=\(0, 4\)"):
        LossConfig(num_matches=(0, 4))
