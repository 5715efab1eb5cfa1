"""VICRegL's networks: backbone + expander + local projector + online classifier."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vicregl_jax.models import backbone_norm, create_backbone, feature_dim
from vicregl_jax.models.heads import MLP, linear_classifier, parse_mlp_spec


def _split(x: jax.Array, sizes: Sequence[int], axis: int) -> list[jax.Array]:
    """Returns the consecutive pieces of x along axis with the given sizes."""
    ends = list(itertools.accumulate(sizes))
    return jnp.split(x, ends[:-1], axis=axis)


class VICRegLModel(nnx.Module):
    """Maps crop groups of views to representations, embeddings, local embeddings and logits.

    Args:
      arch: a name of vicregl_jax.models.ARCHITECTURES.
      mlp: the expander's spec, e.g. "8192-8192-8192" (dropped when alpha == 0).
      maps_mlp: the local projector's spec, e.g. "512-512-512" (dropped when alpha == 1).
      alpha: weight of the global criterion, in [0, 1].
      num_classes: outputs of the online linear classifier.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters, normalisation statistics and
        all outputs stay float32.
      drop_path_rate, layer_scale_init: ConvNeXt only; None means the release's default
        (0.1 and 0, i.e. no layer scale).
      remat: the backbone's rematerialisation per block, "dots" (default) | "block" | "none"
        (models/stack.py).
      unroll_blocks: run the backbone's scans over blocks unrolled; None: on CPU only.

    Views come as one stacked array per crop group (B, V, S, S, 3), as the input pipeline
    gives them, and every output keeps that layout. With BatchNorm (ResNets) every view is
    its own forward pass, with its own batch statistics as in the release; LayerNorm models
    run a group as one batch (the result is the same). Mode: ``model.train()`` /
    ``model.eval()``, or ``nnx.view``. The computations are in named scopes (``backbone_224``
    per crop size, ``heads``) that profiles and HLO metadata show.
    """

    def __init__(
        self,
        *,
        arch: str,
        mlp: str = "8192-8192-8192",
        maps_mlp: str = "512-512-512",
        alpha: float = 0.75,
        num_classes: int = 1000,
        dtype=jnp.float32,
        drop_path_rate: float | None = None,
        layer_scale_init: float | None = None,
        remat: str = "dots",
        unroll_blocks: bool | None = None,
        rngs: nnx.Rngs,
    ):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha}: use a value in [0, 1]")
        norm = backbone_norm(arch)
        dtype = jnp.dtype(dtype)
        parse_mlp_spec(mlp), parse_mlp_spec(maps_mlp)  # fail early, before any init
        backbone_kwargs = {"remat": remat, "unroll": unroll_blocks}
        if norm == "layer":
            if drop_path_rate is not None:
                backbone_kwargs["drop_path_rate"] = drop_path_rate
            if layer_scale_init is not None:
                backbone_kwargs["layer_scale_init"] = layer_scale_init
        elif drop_path_rate or layer_scale_init:
            raise ValueError(
                f"drop_path_rate={drop_path_rate}, layer_scale_init={layer_scale_init} with "
                f"arch={arch!r}: these are ConvNeXt options; leave them None for ResNets"
            )
        self.arch = arch
        self.alpha = float(alpha)
        self.norm = norm
        self.backbone = create_backbone(arch, rngs=rngs, dtype=dtype, **backbone_kwargs)
        dim = feature_dim(arch)
        self.expander = MLP(dim, mlp, norm=norm, dtype=dtype, rngs=rngs) if alpha > 0.0 else None
        self.local_projector = MLP(dim, maps_mlp, norm=norm, dtype=dtype, rngs=rngs) if alpha < 1.0 else None
        self.classifier = linear_classifier(dim, num_classes, dtype=dtype, rngs=rngs)

    def _backbone(self, group: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (maps (B, V, N, C), pooled (B, V, C)) of one crop group (B, V, S, S, 3).

        BatchNorm models run each view as its own forward pass (its own batch statistics, as
        the release); LayerNorm models run the group as one batch: (B, V) merged into B * V
        sample-major, which a batch sharded over devices keeps local.
        """
        b, v = group.shape[:2]
        if self.norm == "batch":
            outputs = [self.backbone(group[:, i]) for i in range(v)]
            return jnp.stack([m for m, _ in outputs], axis=1), jnp.stack([p for _, p in outputs], axis=1)
        maps, pooled = self.backbone(group.reshape(b * v, *group.shape[2:]))
        return maps.reshape(b, v, *maps.shape[1:]), pooled.reshape(b, v, pooled.shape[-1])

    def _head(self, head: MLP, groups: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        """Returns head applied to every vector of groups (B, V_g, ..., C), float32.

        BatchNorm heads run per view (per-view statistics; the local projector's over all B*N
        locations of the view). LayerNorm heads treat every vector alike, so they run once on
        all groups joined along a non-batch axis.
        """
        if self.norm == "batch":
            return tuple(
                jnp.stack([head(g[:, i]) for i in range(g.shape[1])], axis=1).astype(jnp.float32) for g in groups
            )
        flat = [g.reshape(g.shape[0], -1, g.shape[-1]) for g in groups]
        out = head(jnp.concatenate(flat, axis=1)).astype(jnp.float32)
        pieces = _split(out, [f.shape[1] for f in flat], axis=1)
        return tuple(p.reshape(*g.shape[:-1], p.shape[-1]) for p, g in zip(pieces, groups))

    def __call__(self, views: Sequence[jax.Array]) -> dict:
        """Returns representations, embeddings, local_embeddings, maps and logits (float32).

        views: one stacked array (B, V_g, S_g, S_g, 3) per crop group, the two large views
        first. Every output but the logits is a tuple with one array per group:
        representations (B, V_g, C), embeddings (B, V_g, D), local_embeddings
        (B, V_g, N_g, D'), maps (B, V_g, N_g, C). ``embeddings`` is None when alpha == 0 and
        ``local_embeddings`` None when alpha == 1; ``logits`` (B, num_classes) are of the
        classifier on stop_gradient of the first view's representation.
        """
        if not views:
            raise ValueError("views is empty: pass one (B, V, H, W, 3) array per crop group")
        for k, group in enumerate(views):
            if group.ndim != 5 or group.shape[-1] != 3:
                raise ValueError(
                    f"views[{k}] has shape {group.shape}: pass one (B, V, H, W, 3) array "
                    "per crop group (add a view axis with x[:, None] for a single view)"
                )
        features = []
        for group in views:
            with jax.named_scope(f"backbone_{group.shape[2]}"):
                features.append(self._backbone(group))
        maps = tuple(m for m, _ in features)
        representations = tuple(p for _, p in features)
        with jax.named_scope("heads"):
            embeddings = self._head(self.expander, representations) if self.expander is not None else None
            local_embeddings = self._head(self.local_projector, maps) if self.local_projector is not None else None
            logits = self.classifier(jax.lax.stop_gradient(representations[0][:, 0]))
        return {
            "representations": representations,
            "embeddings": embeddings,
            "local_embeddings": local_embeddings,
            "maps": maps,
            "logits": logits.astype(jnp.float32),
        }
