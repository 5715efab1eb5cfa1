"""Optimisers and learning-rate schedule of the release (LARS for ResNets, AdamW for ConvNeXts),
built from optax parts.

Parameters of blocks run by a scan are stacked (axis 0 counts the blocks, see
sharding.STACKED): every block's slice is treated as its own parameter, so weight decay
masks look at the slice's dimensions and LARS takes one trust ratio per block, as for the
same blocks unrolled.
"""

from __future__ import annotations

import jax
import optax

from vicregl_jax import sharding


def learning_rate_schedule(
    *, base_lr: float, batch_size: int, total_steps: int, warmup_steps: int, end_lr_ratio: float = 0.001
) -> optax.Schedule:
    """Returns the per-step schedule: linear warm-up from 0 to base_lr * batch / 256 over
    warmup_steps, then cosine decay to end_lr_ratio of that peak at total_steps (held after)."""
    peak = base_lr * batch_size / 256.0
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps={total_steps} must exceed warmup_steps={warmup_steps}: train for more "
            "epochs or lower config.optim.warmup_epochs."
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=peak * end_lr_ratio,
    )


def matrix_mask(params):
    """Returns a pytree of bools: True for parameters with 2+ dims (kernels), False for biases
    and normalisation scales, which get neither weight decay nor LARS adaptation (a stacked
    parameter's block axis does not count)."""
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim - sharding.is_stacked(path) > 1, params)


def per_block(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Returns the stateless transformation inner applied to each block of a stacked
    parameter on its own (jax.vmap over axis 0), and to other parameters as they are."""

    def update(updates, state, params=None):
        def leaf(path, update, param):
            if sharding.is_stacked(path):
                return jax.vmap(lambda u, p: inner.update(u, state, p)[0])(update, param)
            return inner.update(update, state, param)[0]

        return jax.tree_util.tree_map_with_path(leaf, updates, params), state

    return optax.GradientTransformation(inner.init, update)


def lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> optax.GradientTransformation:
    """Returns LARS as the release runs it: decay, trust ratio, momentum, then the learning rate.

    optax.lars applies the learning rate before the momentum trace; the release accumulates the
    momentum of the unscaled update and multiplies by the current learning rate, which differs
    while the schedule moves. We keep the release's order.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=matrix_mask),
        optax.masked(per_block(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient)), matrix_mask),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.05, b1=0.9, b2=0.999, eps=1e-8
) -> optax.GradientTransformation:
    """Returns AdamW (PyTorch's decoupled weight decay) with decay on 2+ dim parameters only."""
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=matrix_mask)


OPTIMIZERS = {"lars": lars, "adamw": adamw}


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, **kwargs) -> optax.GradientTransformation:
    """Returns the optimiser called name ("lars" or "adamw") with the given settings."""
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optim.name={name!r} is unknown; use one of {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[name](learning_rate, **kwargs)
