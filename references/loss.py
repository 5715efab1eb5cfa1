"""An independent float64 NumPy reference of the VICRegL criterion, written from the method's definition
with explicit loops (over pairs, directions, examples, locations and kept indices).

It shares no code with vicregl_jax.losses. Ties: the nearest candidate is the first minimum and
kept locations are ranked by a stable sort, i.e. the lower index wins (as documented there).
"""

import numpy as np


def var_term(x):
    """x: (B, K, D). mean over (k, d) of relu(1 - sqrt(unbiased var + 1e-4))."""
    b, k, d = x.shape
    out = np.zeros((k, d))
    for kk in range(k):
        cols = x[:, kk, :]
        var = np.sum((cols - cols.mean(axis=0)) ** 2, axis=0) / (b - 1)
        out[kk] = np.maximum(0.0, 1.0 - np.sqrt(var + 1e-4))
    return out.mean()


def cov_term(x):
    """x: (B, K, D). mean over k of sum of squared off-diagonal covariance entries / D."""
    b, k, d = x.shape
    vals = []
    for kk in range(k):
        c = np.cov(x[:, kk, :], rowvar=False, ddof=1)
        off = c - np.diag(np.diag(c))
        vals.append(np.sum(off**2) / d)
    return float(np.mean(vals))


def vicreg(x, y, ci=25.0, cv=25.0, cc=1.0):
    if x.ndim == 2:
        x, y = x[:, None], y[:, None]
    inv = ci * np.mean((x - y) ** 2)
    var = cv * (var_term(x) + var_term(y)) / 2
    cov = cc * (cov_term(x) + cov_term(y)) / 2
    return inv, var, cov


def pairs(v):
    return [(i, j) for i in range(2) for j in range(v) if j != i]


def global_terms(emb, ci=25.0, cv=25.0, cc=1.0):
    emb = [np.asarray(e, np.float64) for e in emb]
    p = pairs(len(emb))
    inv = ci * np.mean([np.mean((emb[i] - emb[j]) ** 2) for i, j in p])
    var = cv * np.mean([var_term(e[:, None]) for e in emb])
    cov = cc * np.mean([cov_term(e[:, None]) for e in emb])
    return inv, var, cov


def matches(src_keys, dst_keys, src, dst, k):
    """For each example: nearest dst location of every src location by Euclidean distance of the
    keys; keep the k src locations with the smallest such distance, in their original order."""
    b, n_a, _ = src_keys.shape
    xs, ys = [], []
    for e in range(b):
        nearest = np.zeros(n_a, dtype=int)
        nearest_d = np.zeros(n_a)
        for a in range(n_a):
            dist = np.sqrt(np.sum((src_keys[e, a][None, :] - dst_keys[e]) ** 2, axis=1))
            nearest[a] = np.argmin(dist)  # the first minimum
            nearest_d[a] = dist[nearest[a]]
        kept = np.sort(np.argsort(nearest_d, kind="stable")[:k])
        xs.append(src[e, kept])
        ys.append(dst[e, nearest[kept]])
    return np.stack(xs), np.stack(ys)


def local_terms(maps, grids, num_matches=(20, 4), l2_all_matches=True, fast_vc_reg=False, ci=25.0, cv=25.0, cc=1.0):
    maps = [np.asarray(m, np.float64) for m in maps]
    grids = [np.asarray(g, np.float64).reshape(g.shape[0], -1, 2) for g in grids]
    p = pairs(len(maps))
    inv_sum = var_sum = cov_sum = 0.0
    for i, j in p:
        mi, mj, gi, gj = maps[i], maps[j], grids[i], grids[j]
        k_l2 = (mi.shape[1], mj.shape[1]) if l2_all_matches else num_matches
        parts = [
            [matches(mi, mj, mi, mj, k_l2[0]), matches(mj, mi, mj, mi, k_l2[1])],
            [matches(gi, gj, mi, mj, num_matches[0]), matches(gj, gi, mj, mi, num_matches[1])],
        ]
        for part in parts:
            for x, y in part:
                if fast_vc_reg:
                    inv_sum += np.mean((x - y) ** 2) / 2
                else:
                    a, b_, c = vicreg(x, y, ci, cv, cc)
                    inv_sum += a / 2
                    var_sum += b_ / 2
                    cov_sum += c / 2
    n = len(p)
    if fast_vc_reg:
        inv = ci * inv_sum / n
        var = cv * np.mean([var_term(m) for m in maps])
        cov = cc * np.mean([cov_term(m) for m in maps])
        return inv, var, cov
    return inv_sum / n, var_sum / n, cov_sum / n


def total(emb, maps, grids, alpha=0.75, **kw):
    out = {}
    t = 0.0
    if alpha > 0:
        g = global_terms(emb)
        out.update(global_inv=g[0], global_var=g[1], global_cov=g[2])
        t += alpha * sum(g)
    if alpha < 1:
        loc = local_terms(maps, grids, **kw)
        out.update(local_inv=loc[0], local_var=loc[1], local_cov=loc[2])
        t += (1 - alpha) * sum(loc)
    out["vicreg"] = t
    return t, out
