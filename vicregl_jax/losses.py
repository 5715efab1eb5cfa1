"""The VICRegL criterion (Bardes, Ponce, LeCun 2022; the authors' release) as pure, jittable jnp functions.

Shapes: B images per global batch; views come as one stacked array per crop group, (B, V_g,
...) for the V_g views of group g (the first group holds the two large views every pair is
anchored on), as the input pipeline and the model produce them; N_g locations per view of
group g, D embedding channels. Every function works on global `jax.Array`s sharded over the
batch axis of a mesh: under SPMD `jax.jit` a mean over the batch axis is already a mean over the
global batch, so the variance and covariance statistics need no `pmean`. Inside a train step's
`sharding.step_context` they are computed with explicit collectives instead (`batch_statistics`:
one all-to-all of the matched batches rather than XLA's all-reduce of (K, D, D) partial
covariances), and the matching runs where each device's examples are; the values are the same.

Matching (`vicregl_jax.matching`) is per example and `jax.vmap`-ed over the batch; the ordered
view pairs whose second view lies in one group are `jax.vmap`-ed over that group's view axis:
no Python loop over the batch, over locations, or over the views of a group.

This module knows nothing of models or data: it takes sequences of arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from vicregl_jax import sharding
from vicregl_jax.matching import match_by_embedding, match_by_location
from vicregl_jax.metrics import classifier_terms

# Statistics are float32 and their matmuls run at full float32 precision: on TPU the default
# precision would take bfloat16 passes and the covariance sums would lose their digits.
_HIGHEST = jax.lax.Precision.HIGHEST
_STD_EPS = 1e-4  # added to the variance before the square root, as the release


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The criterion's settings; hashable so that it can be a static argument of `jax.jit`."""

    alpha: float = 0.75  # weight of the global criterion; 1 - alpha weighs the local one
    inv_coeff: float = 25.0
    var_coeff: float = 25.0
    cov_coeff: float = 1.0
    num_matches: tuple[int, int] = (20, 4)  # kept location matches for i -> j and j -> i
    l2_all_matches: bool = True  # embedding matching keeps every location (the release's 1)
    fast_vc_reg: bool = False  # local var / cov once per view on the whole map

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} is outside [0, 1]; use e.g. 0.75 or 0.9.")
        nm = tuple(int(n) for n in self.num_matches)
        if len(nm) != 2 or min(nm) < 1:
            raise ValueError(
                f"num_matches={self.num_matches} must be two positive integers "
                "(matches kept for i -> j, then j -> i), e.g. (20, 4)."
            )
        object.__setattr__(self, "num_matches", nm)


# --------------------------------------------------------------------------------------------
# VICReg statistics
# --------------------------------------------------------------------------------------------


def _as_f32(x: jax.Array) -> jax.Array:
    """Returns x in float32, or wider if it already is (float64 for gradient checks)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _replicated(x: jax.Array) -> jax.Array:
    """Returns x gathered onto every device when its type carries an explicit sharding.

    Under an Explicit-axes mesh (the default of `jax.make_mesh`), a product of two
    batch-sharded operands over a non-contracting batch axis is a type error; under Auto axes
    (or no mesh) the partitioner decides and x is returned as is.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is None or all(axis is None for axis in sharding.spec):
        return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))


def _center(x: jax.Array) -> jax.Array:
    return x - jnp.mean(x, axis=0, keepdims=True)


def _statistics(x: jax.Array, *, gather=lambda a: a) -> tuple[jax.Array, jax.Array]:
    """Returns per k of x (B, K, D) with the whole batch: the summed variance terms
    sum_d relu(1 - sqrt(var + 1e-4)) and the sum of squared off-diagonal covariances.

    ||X^T X||_F = ||X X^T||_F, so the covariance sum comes from either the D x D covariance
    or the B x B Gram matrix of the centred batch; we take the smaller one, which for the
    usual B < D (8192-wide expanders) is 2 * D / B times cheaper. gather: applied to the
    second operand of the Gram product (a replication when its type carries a sharding).
    """
    b, _, d = x.shape
    xc = _center(x)
    var = jnp.sum(jnp.square(xc), axis=0) / (b - 1)  # (K, D)
    var_sum = jnp.sum(jax.nn.relu(1.0 - jnp.sqrt(var + _STD_EPS)), axis=-1)
    if b < d:
        gram = jnp.einsum("bkd,ckd->kbc", xc, gather(xc), precision=_HIGHEST) / (b - 1)
        total = jnp.sum(jnp.square(gram), axis=(1, 2))
    else:
        cov = jnp.einsum("bkd,bke->kde", xc, xc, precision=_HIGHEST) / (b - 1)
        total = jnp.sum(jnp.square(cov), axis=(1, 2))
    return var_sum, total - jnp.sum(jnp.square(var), axis=1)


def _by_locations(x: jax.Array, devices: int) -> tuple[jax.Array, jax.Array]:
    """_statistics of a batch-sharded x (B, K, D) computed with the locations k spread over the
    devices: one all-to-all gives each device the whole batch of K / devices locations
    (K padded with zeros to a multiple), whose statistics need no further collective."""
    k = x.shape[1]
    padded = -(-k // devices) * devices
    x = jnp.pad(x, ((0, 0), (0, padded - k), (0, 0)))

    def local(shard):  # (B / devices, padded, D) -> the whole batch of padded / devices locations
        whole = jax.lax.all_to_all(shard, sharding.DATA_AXIS, split_axis=1, concat_axis=0, tiled=True)
        return _statistics(whole)

    spec = PartitionSpec(sharding.DATA_AXIS)
    var_sum, offdiag = jax.shard_map(
        local, mesh=jax.sharding.get_abstract_mesh(), in_specs=spec, out_specs=(spec, spec)
    )(x)
    return var_sum[:k], offdiag[:k]


def _by_channels(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """_statistics of a batch-sharded x (B, K, D) computed with the channels d spread over the
    devices: one all-to-all gives each device the whole batch of D / devices channels; the
    variance terms and the B x B Gram matrices are sums over channels, added over devices."""
    axis = sharding.DATA_AXIS

    def local(shard):  # (B / devices, K, D) -> the whole batch of D / devices channels
        xc = _center(jax.lax.all_to_all(shard, axis, split_axis=2, concat_axis=0, tiled=True))
        b = xc.shape[0]
        var = jnp.sum(jnp.square(xc), axis=0) / (b - 1)  # (K, D / devices)
        var_sum = jax.lax.psum(jnp.sum(jax.nn.relu(1.0 - jnp.sqrt(var + _STD_EPS)), axis=-1), axis)
        gram = jax.lax.psum(jnp.einsum("bkd,ckd->kbc", xc, xc, precision=_HIGHEST), axis) / (b - 1)
        diagonal = jax.lax.psum(jnp.sum(jnp.square(var), axis=1), axis)
        return var_sum, jnp.sum(jnp.square(gram), axis=(1, 2)) - diagonal

    return jax.shard_map(
        local,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=PartitionSpec(axis),
        out_specs=(PartitionSpec(), PartitionSpec()),
    )(x)


def batch_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns, per k of x (B, K, D), the summed variance terms sum_d relu(1 - std_d) and the
    sum of squared off-diagonal entries of the (D, D) batch covariance, over the global batch.

    Inside a train step's sharding.step_context, with the batch sharded over the devices, the
    statistics are computed with explicit collectives that move far fewer bytes than XLA's
    all-reduce of (K, D, D) partial covariances (or all-gather of the batch for the Gram form):
    one all-to-all of the batch (forward, and its transpose backward), spreading either the
    locations k or the channels d over the devices, whichever moves fewer bytes (the channels
    add an all-reduce of the K x B x B Gram matrices). Elsewhere the plain computation.
    """
    x = _as_f32(x)
    devices = sharding.data_axis_size()
    b, k, d = x.shape
    if devices == 1 or b % devices:
        return _statistics(x, gather=_replicated)
    padded = -(-k // devices) * devices
    by_locations = 2 * padded * d  # all-to-all elements, forward and backward, per local example
    by_channels = 2 * k * d + 2 * k * b * b * devices / b  # ... + the Gram all-reduce, per local example
    if by_locations <= by_channels or d % devices:
        return _by_locations(x, devices)
    return _by_channels(x)


def variance_term(x: jax.Array) -> jax.Array:
    """Returns mean over (k, d) of relu(1 - sqrt(var_unbiased + 1e-4)) for x (B, K, D) or (B, D)."""
    x = _as_f32(x)
    if x.ndim == 2:
        x = x[:, None, :]
    return jnp.mean(batch_statistics(x)[0]) / x.shape[-1]


def offdiag_cov_sq_sum(x: jax.Array) -> jax.Array:
    """Returns, per k, the sum of squared off-diagonal entries of the (D, D) batch covariance of
    x (B, K, D)."""
    return batch_statistics(x)[1]


def covariance_term(x: jax.Array) -> jax.Array:
    """Returns mean over k of (sum of squared off-diagonal covariances / D) for x (B, K, D) or (B, D)."""
    x = _as_f32(x)
    if x.ndim == 2:
        x = x[:, None, :]
    return jnp.mean(offdiag_cov_sq_sum(x)) / x.shape[-1]


def _split(x: jax.Array, sizes: Sequence[int], axis: int) -> list[jax.Array]:
    """Returns the consecutive pieces of x along axis with the given sizes."""
    ends = list(itertools.accumulate(sizes))
    return jnp.split(x, ends[:-1], axis=axis)


# --------------------------------------------------------------------------------------------
# Views: one stacked array per crop group
# --------------------------------------------------------------------------------------------


def split_views(groups: Sequence[jax.Array]) -> list[jax.Array]:
    """Returns the views of groups (B, V_g, ...) as a list of (B, ...) arrays, in view order."""
    return [g[:, v] for g in groups for v in range(g.shape[1])]


def num_views(groups: Sequence[jax.Array]) -> int:
    """Returns the number of views over all groups (B, V_g, ...)."""
    return sum(g.shape[1] for g in groups)


def _without_view(group: jax.Array, i: int) -> jax.Array | None:
    """Returns group (B, V, ...) without view i (slices, no gather), or None if it was the only one."""
    pieces = [p for p in (group[:, :i], group[:, i + 1 :]) if p.shape[1]]
    if not pieces:
        return None
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


# --------------------------------------------------------------------------------------------
# Global criterion
# --------------------------------------------------------------------------------------------


def view_pairs(num_views: int) -> list[tuple[int, int]]:
    """Returns the ordered pairs (i, j), i in {0, 1}, j != i, over which both criteria average."""
    return [(i, j) for i in range(min(2, num_views)) for j in range(num_views) if j != i]


def global_loss(
    embeddings: Sequence[jax.Array], cfg: LossConfig = LossConfig()
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns the weighted global (inv, var, cov) over the expander outputs, one (B, V_g, D)
    array per crop group."""
    z = [_as_f32(e) for e in split_views(embeddings)]
    pairs = view_pairs(len(z))
    inv = cfg.inv_coeff * sum(jnp.mean(jnp.square(z[i] - z[j])) for i, j in pairs) / len(pairs)
    # Every view is one k of the statistics: one batch_statistics call for all views.
    var_sum, offdiag = batch_statistics(jnp.concatenate([_as_f32(e) for e in embeddings], axis=1))
    dim = z[0].shape[-1]
    var = cfg.var_coeff * jnp.mean(var_sum) / dim
    cov = cfg.cov_coeff * jnp.mean(offdiag) / dim
    return inv, var, cov


# --------------------------------------------------------------------------------------------
# Local criterion
# --------------------------------------------------------------------------------------------


def _pair_matches(m_i, m_j, g_i, g_j, cfg: LossConfig):
    """Returns (inv, pieces) of one ordered pair: its weighted local invariance (feature +
    location parts) and the matched batches [x, y] of its four directions, 8 arrays (B, K, D)
    whose variance and covariance terms the pair adds, each with weight 1/4."""
    n_i, n_j = m_i.shape[1], m_j.shape[1]
    l2_matches = (n_i, n_j) if cfg.l2_all_matches else cfg.num_matches
    directions = (
        match_by_embedding(m_i, m_j, l2_matches[0]),  # the feature part's two directions
        match_by_embedding(m_j, m_i, l2_matches[1]),
        match_by_location(m_i, m_j, g_i, g_j, cfg.num_matches[0]),  # the location part's
        match_by_location(m_j, m_i, g_j, g_i, cfg.num_matches[1]),
    )
    # The two parts are added and their two directions averaged.
    inv = cfg.inv_coeff * sum(jnp.mean(jnp.square(x - y)) for x, y in directions) / 2
    return inv, [a for xy in directions for a in xy]


def _piece_means(per_k: jax.Array, sizes: Sequence[int]) -> jax.Array:
    """Returns the mean over each piece's locations of per_k (..., sum(sizes)), summed over
    the pieces: (...)."""
    return sum(jnp.mean(p, axis=-1) for p in _split(per_k, sizes, -1))


def local_loss(
    local_embeddings: Sequence[jax.Array], grids: Sequence[jax.Array], cfg: LossConfig = LossConfig()
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns the weighted local (inv, var, cov), averaged over the ordered view pairs.

    One array per crop group: local_embeddings[g] is (B, V_g, N_g, D) and grids[g] is
    (B, V_g, n, n, 2) or (B, V_g, N_g, 2), in the original image's pixels. The anchors i are
    the first two views of group 0; the pairs (i, j) with j in one group run as one vmap over
    that group's view axis, and the variance / covariance statistics of all their matched
    batches are one batch_statistics call (their locations joined along one axis).
    """
    maps = [_as_f32(m) for m in local_embeddings]
    grids = [_as_f32(g).reshape(*g.shape[:2], -1, g.shape[-1]) for g in grids]
    check_local_inputs(maps, grids, cfg)
    dim = maps[0].shape[-1]
    num_pairs = len(view_pairs(num_views(maps)))
    pair_matches = jax.vmap(functools.partial(_pair_matches, cfg=cfg), in_axes=(None, 1, None, 1))
    inv = var = cov = jnp.float32(0.0)
    for i in range(2):
        m_i, g_i = maps[0][:, i], grids[0][:, i]
        for k, (m_j, g_j) in enumerate(zip(maps, grids)):
            if k == 0:
                m_j, g_j = _without_view(m_j, i), _without_view(g_j, i)
                if m_j is None:
                    continue
            pair_inv, pieces = pair_matches(m_i, m_j, g_i, g_j)  # pieces: (V_j, B, K, D)
            inv = inv + pair_inv.sum()
            if cfg.fast_vc_reg:
                continue
            sizes = [p.shape[2] for p in pieces]
            joined = jnp.swapaxes(jnp.concatenate(pieces, axis=2), 0, 1)  # (B, V_j, K_all, D)
            b, v = joined.shape[:2]
            var_sum, offdiag = batch_statistics(joined.reshape(b, v * sum(sizes), dim))
            var = var + cfg.var_coeff * _piece_means(var_sum.reshape(v, -1), sizes).sum() / (4 * dim)
            cov = cov + cfg.cov_coeff * _piece_means(offdiag.reshape(v, -1), sizes).sum() / (4 * dim)
    inv, var, cov = inv / num_pairs, var / num_pairs, cov / num_pairs
    if cfg.fast_vc_reg:
        # The release's fast branch overwrites its running sum of cov terms at every view (and
        # then adds the per-location vector to its own mean); we implement the evident intent:
        # var and cov of each view's whole local map, averaged over the views.
        sizes = [n for m in maps for n in [m.shape[2]] * m.shape[1]]  # one piece per view
        var_sum, offdiag = batch_statistics(jnp.concatenate([m.reshape(m.shape[0], -1, dim) for m in maps], axis=1))
        var = cfg.var_coeff * _piece_means(var_sum, sizes) / (dim * len(sizes))
        cov = cfg.cov_coeff * _piece_means(offdiag, sizes) / (dim * len(sizes))
    return inv, var, cov


def check_local_inputs(maps, grids, cfg: LossConfig) -> None:
    """Raises ValueError when the local inputs (per group: maps (B, V, N, D), grids (B, V, N, 2))
    cannot give the criterion."""
    if len(grids) != len(maps):
        raise ValueError(
            f"Got {len(maps)} groups of local embeddings but {len(grids)} groups of location grids; "
            "pass one grid per view, grouped like the views."
        )
    for k, (m, g) in enumerate(zip(maps, grids)):
        if m.ndim != 4:
            raise ValueError(f"Local embeddings of group {k} have shape {m.shape}; expected (B, V, N, D).")
        if g.ndim != 4 or g.shape[-1] != 2 or g.shape[:3] != m.shape[:3]:
            raise ValueError(
                f"Group {k}: grids of shape {g.shape} (flattened) do not match its local "
                f"embeddings {m.shape}: the grids need (B, V, N, 2) with N = h * w of the map; "
                "make the crop size equal the backbone stride times the grid size."
            )
    if not maps or maps[0].shape[1] < 2:
        raise ValueError(
            "The local criterion needs the two large views in the first group; got groups of "
            f"shapes {[m.shape for m in maps]}."
        )
    num_matches_locations = maps[0].shape[2]
    all_locations = min(m.shape[2] for m in maps)
    if cfg.num_matches[0] > num_matches_locations or cfg.num_matches[1] > all_locations:
        raise ValueError(
            f"num_matches={cfg.num_matches} asks for more matches than there are locations: "
            f"the direction i -> j keeps num_matches[0] of the {num_matches_locations} locations "
            f"of a large view and j -> i keeps num_matches[1] of the {all_locations} of the "
            f"smallest view (group shapes {[m.shape for m in maps]}); lower num_matches to at most "
            f"({num_matches_locations}, {all_locations})."
        )


def check_criterion_inputs(embeddings, local_embeddings, grids, cfg: LossConfig) -> None:
    """Raises ValueError, before any computation, for inputs the criterion cannot take."""
    if cfg.alpha > 0.0:
        if embeddings is None or num_views(embeddings) < 2:
            raise ValueError("alpha > 0 needs the expander outputs of at least 2 views.")
        check_batch(embeddings, "embeddings")
    if cfg.alpha < 1.0:
        if local_embeddings is None or grids is None:
            raise ValueError("alpha < 1 needs the local embeddings and the location grids of every view.")
        check_batch(local_embeddings, "local embeddings")
        flat = [g.reshape(*g.shape[:2], -1, g.shape[-1]) for g in grids]
        check_local_inputs(local_embeddings, flat, cfg)
        if cfg.alpha > 0.0 and local_embeddings[0].shape[0] != embeddings[0].shape[0]:
            raise ValueError(
                f"Batch of the embeddings ({embeddings[0].shape[0]}) differs from the local "
                f"embeddings' ({local_embeddings[0].shape[0]}); they must come from the same images."
            )


def check_batch(groups: Sequence[jax.Array], what: str) -> None:
    """Raises ValueError unless every group has the same batch (> 1) and channel sizes."""
    batches = {a.shape[0] for a in groups}
    channels = {a.shape[-1] for a in groups}
    shapes = [tuple(a.shape) for a in groups]
    if len(batches) != 1 or len(channels) != 1:
        raise ValueError(
            f"The {what} of all views must share batch and channel sizes; got group shapes {shapes}. "
            "Pass views of the same images through the same projector."
        )
    (b,) = batches
    if b < 2:
        raise ValueError(
            f"The {what} have a batch of {b}: the variance and covariance over the batch are "
            "undefined; use a global batch of at least 2 (the release uses 2048)."
        )


# --------------------------------------------------------------------------------------------
# The total
# --------------------------------------------------------------------------------------------


def vicregl_loss(
    embeddings: Sequence[jax.Array] | None,
    local_embeddings: Sequence[jax.Array] | None,
    grids: Sequence[jax.Array] | None,
    cfg: LossConfig = LossConfig(),
    *,
    logits: jax.Array | None = None,
    labels: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (total, terms): alpha * global + (1 - alpha) * local + classifier cross-entropy.

    Per crop group: embeddings (B, V_g, D), local_embeddings (B, V_g, N_g, D') and grids
    (B, V_g, n, n, 2); logits (B, K) and labels (B,) of the online classifier. terms holds
    global_{inv,var,cov}, local_{inv,var,cov}, vicreg (the total without the classifier) and,
    when logits and labels are given, cls_loss, top1, top5. Terms of a branch that alpha turns
    off are 0 and its inputs may be None.
    """
    check_criterion_inputs(embeddings, local_embeddings, grids, cfg)
    with jax.named_scope("criterion"):  # what profiles and HLO metadata show
        return _vicregl_loss(embeddings, local_embeddings, grids, cfg, logits, labels)


def _vicregl_loss(embeddings, local_embeddings, grids, cfg, logits, labels):
    """vicregl_loss after its input checks."""
    zero = jnp.float32(0.0)
    terms = {k: zero for k in ("global_inv", "global_var", "global_cov", "local_inv", "local_var", "local_cov")}
    total = zero
    if cfg.alpha > 0.0:
        g = global_loss(embeddings, cfg)
        terms.update(global_inv=g[0], global_var=g[1], global_cov=g[2])
        total = total + cfg.alpha * sum(g)
    if cfg.alpha < 1.0:
        loc = local_loss(local_embeddings, grids, cfg)
        terms.update(local_inv=loc[0], local_var=loc[1], local_cov=loc[2])
        total = total + (1.0 - cfg.alpha) * sum(loc)
    terms["vicreg"] = total
    if logits is not None and labels is not None:
        cls = classifier_terms(logits, labels)
        terms.update(cls)
        total = total + cls["cls_loss"]
    terms["loss"] = total
    return total, terms
