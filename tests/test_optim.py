"""Optimisers and schedule against independent references (NumPy LARS, torch AdamW)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vicregl_jax import optim


def release_schedule(step, batch, base_lr, end_ratio, total, warmup):
    """The release's schedule, written out: warm-up from 0, then cosine to end_ratio of the peak."""
    peak = base_lr * batch / 256
    if step < warmup:
        return step / warmup * peak
    t = min(step - warmup, total - warmup) / (total - warmup)
    return (peak - peak * end_ratio) * 0.5 * (1 + math.cos(math.pi * t)) + peak * end_ratio


def test_schedule_matches_formula():
    kw = dict(base_lr=0.2, batch_size=2048, total_steps=1000, warmup_steps=100, end_lr_ratio=0.001)
    sched = optim.learning_rate_schedule(**kw)
    for step in [0, 1, 50, 99, 100, 101, 500, 999, 1000, 1200]:
        want = release_schedule(step, 2048, 0.2, 0.001, 1000, 100)
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step
    assert float(sched(100)) == pytest.approx(1.6)
    with pytest.raises(ValueError, match="total_steps=10 must exceed warmup_steps=10"):
        optim.learning_rate_schedule(base_lr=0.1, batch_size=256, total_steps=10, warmup_steps=10)


def params_and_grads(seed):
    rng = np.random.default_rng(seed)
    params = {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,)), "zero": np.zeros((2, 2))}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(4)]
    return params, grads


def test_lars_matches_numpy_reference():
    """The release's LARS: decay and trust ratio on matrices only, momentum of the unscaled
    update, then the current learning rate (which changes every step here)."""
    params, grads = params_and_grads(0)
    lrs = [0.5, 1.0, 0.7, 0.2]
    wd, mom, eta = 1e-2, 0.9, 1e-3
    # Reference.
    p_ref = {k: v.copy() for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    for g, lr in zip(grads, lrs):
        for k in p_ref:
            d = g[k].copy()
            if p_ref[k].ndim > 1:
                d = d + wd * p_ref[k]
                pn, un = np.linalg.norm(p_ref[k]), np.linalg.norm(d)
                q = eta * pn / un if (pn > 0 and un > 0) else 1.0
                d = d * q
            mu[k] = mom * mu[k] + d
            p_ref[k] = p_ref[k] - lr * mu[k]
    # Ours, with the learning rate as a schedule of the step.
    tx = optim.lars(lambda step: jnp.asarray(lrs)[step], weight_decay=wd, momentum=mom, trust_coefficient=eta)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), p_ref[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    params, grads = params_and_grads(1)
    tp = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in params.items()}
    groups = [
        {"params": [tp["bias"]], "weight_decay": 0.0},
        {"params": [tp["kernel"], tp["zero"]], "weight_decay": 0.05},
    ]
    opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.0)
    for g in grads:
        for k, v in tp.items():
            v.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
    tx = optim.make_optimizer("adamw", 0.01, weight_decay=0.05)
    p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), g), state, p)
        p = optax.apply_updates(p, updates)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match=r"config.optim.name='sgdd'.*'adamw', 'lars'"):
        optim.make_optimizer("sgdd", 0.1)
