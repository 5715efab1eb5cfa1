"""VICRegL's networks: backbone + expander + local projector + online classifier."""
from __future__ import annotations

import itertools
from typing import Sequence

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
    """Maps a list of views to representations, embeddings, local embeddings and logits.

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

    With BatchNorm (ResNets) every view is its own forward pass, with its own batch
    statistics as in the release; LayerNorm models run same-size views as one batch (the
    result is the same). Mode: ``model.train()`` / ``model.eval()``, or ``nnx.view``.
    """

    def __init__(self, *, arch: str, mlp: str = "8192-8192-8192",
                 maps_mlp: str = "512-512-512", alpha: float = 0.75,
                 num_classes: int = 1000, dtype=jnp.float32,
                 drop_path_rate: float | None = None, layer_scale_init: float | None = None,
                 rngs: nnx.Rngs):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha}: use a value in [0, 1]")
        norm = backbone_norm(arch)
        dtype = jnp.dtype(dtype)
        parse_mlp_spec(mlp), parse_mlp_spec(maps_mlp)  # fail early, before any init
        backbone_kwargs = {}
        if norm == "layer":
            if drop_path_rate is not None:
                backbone_kwargs["drop_path_rate"] = drop_path_rate
            if layer_scale_init is not None:
                backbone_kwargs["layer_scale_init"] = layer_scale_init
        elif drop_path_rate or layer_scale_init:
            raise ValueError(
                f"drop_path_rate={drop_path_rate}, layer_scale_init={layer_scale_init} with "
                f"arch={arch!r}: these are ConvNeXt options; leave them None for ResNets")
        self.arch = arch
        self.alpha = float(alpha)
        self.norm = norm
        self.backbone = create_backbone(arch, rngs=rngs, dtype=dtype, **backbone_kwargs)
        dim = feature_dim(arch)
        self.expander = (MLP(dim, mlp, norm=norm, dtype=dtype, rngs=rngs)
                         if alpha > 0.0 else None)
        self.local_projector = (MLP(dim, maps_mlp, norm=norm, dtype=dtype, rngs=rngs)
                                if alpha < 1.0 else None)
        self.classifier = linear_classifier(dim, num_classes, dtype=dtype, rngs=rngs)

    def _backbone(self, views: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
        """Returns (maps, pooled) per view; LayerNorm models batch runs of same-size views."""
        if self.norm == "batch":
            return [self.backbone(v) for v in views]
        outputs = []
        for _, group in itertools.groupby(views, key=lambda v: v.shape):
            group = list(group)
            if len(group) == 1:
                outputs.append(self.backbone(group[0]))
                continue
            # One batch ordered (sample, view): the sample axis stays major, so a batch
            # sharded over devices needs no communication to be merged or split again.
            b, v = group[0].shape[0], len(group)
            maps, pooled = self.backbone(
                jnp.stack(group, axis=1).reshape(b * v, *group[0].shape[1:]))
            maps = maps.reshape(b, v, *maps.shape[1:])
            pooled = pooled.reshape(b, v, pooled.shape[-1])
            outputs += [(maps[:, i], pooled[:, i]) for i in range(v)]
        return outputs

    def __call__(self, views: Sequence[jax.Array]) -> dict:
        """Returns representations, embeddings, local_embeddings, maps and logits (float32).

        ``embeddings`` is None when alpha == 0 and ``local_embeddings`` None when
        alpha == 1; ``logits`` are of the classifier on stop_gradient(representations[0]).
        """
        if not views:
            raise ValueError("views is empty: pass a list of (B, H, W, 3) image batches")
        features = self._backbone(views)
        maps = [m for m, _ in features]
        representations = [p for _, p in features]
        # BatchNorm heads run per view (per-view statistics; the local projector's over all
        # B*N locations of the view). LayerNorm heads treat every vector alike, so they
        # run once on all views, joined along a non-batch axis.
        together = self.norm == "layer"
        same_batch = len({r.shape[0] for r in representations}) == 1

        embeddings = None
        if self.expander is not None:
            if together and same_batch:
                z = self.expander(jnp.stack(representations, axis=1))
                embeddings = [z[:, i] for i in range(len(views))]
            else:
                embeddings = [self.expander(r) for r in representations]
            embeddings = [e.astype(jnp.float32) for e in embeddings]

        local_embeddings = None
        if self.local_projector is not None:
            if together and same_batch:
                z = self.local_projector(jnp.concatenate(maps, axis=1))
                local_embeddings = _split(z, [m.shape[1] for m in maps], axis=1)
            else:
                local_embeddings = [self.local_projector(m) for m in maps]
            local_embeddings = [e.astype(jnp.float32) for e in local_embeddings]

        logits = self.classifier(jax.lax.stop_gradient(representations[0]))
        return {
            "representations": representations,
            "embeddings": embeddings,
            "local_embeddings": local_embeddings,
            "maps": maps,
            "logits": logits.astype(jnp.float32),
        }
