"""Identical blocks under one scan, and rematerialisation per block.

A stage of n identical blocks written as a Python loop is traced, lowered and compiled n
times; ``BlockStack`` holds their parameters stacked along a leading axis (under the attribute
``stacked``, sharding.STACKED) and runs them with one ``jax.lax.scan``, so XLA compiles the
block once. ConvNeXt stage 3 (27 blocks) and the ResNets' stages (every block after the first)
are BlockStacks. layout.py maps block j of a stack to the release's per-block names, so the
weights convert to and from PyTorch as before.

XLA:CPU runs convolutions inside a loop about 8x slower than the same convolutions unrolled
(ResNet-50 forward + backward, batch 4 at 112: 5.4 s against 0.7 s): on CPU a stack is
unrolled by default (``unroll``; the same parameters, the scan's ``unroll=True``), on GPU and
TPU it is one loop.

Rematerialisation (``remat``), per block: "dots" (the default) keeps the outputs of the
matmuls and convolutions and recomputes the rest (normalisation, GELU / ReLU, adds) in the
backward pass; "block" keeps only each block's input and recomputes the whole block
(jax.checkpoint with nothing saveable); "none" keeps every value the backward pass uses.
Under a scan "none" costs more memory than the same blocks unrolled: the loop has to store
every intermediate of every block, where XLA recomputes the elementwise ones it fuses in an
unrolled program (ConvNeXt-S backbone, batch 16, bfloat16, XLA:CPU buffer assignment:
unrolled 3.7 GiB, scanned "none" 5.0 GiB, "dots" 2.1 GiB, "block" 1.0 GiB). "dots" is that
recomputation made explicit, so it applies to stacks only; a block outside a stack is left to
XLA under "dots" (and "none").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vicregl_jax import sharding
from vicregl_jax.models.layers import DropPath, drop_samples

REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}


def check_remat(remat: str) -> str:
    """Returns remat if it names a policy, else raises ValueError naming the choices."""
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"remat={remat!r}: use one of {', '.join(repr(k) for k in REMAT_POLICIES)} (config.model.remat)"
        )
    return remat


def _checkpointed(fn: Callable, remat: str, *, prevent_cse: bool = True) -> Callable:
    """Returns fn under jax.checkpoint with the named policy ("none": fn itself)."""
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


def apply_block(block: nnx.Module, x: jax.Array, remat: str = "none") -> jax.Array:
    """Returns block(x) with the remat policy, its output constrained to the batch axis.

    Updates the block's state (BatchNorm statistics, drop-path stream) in place. Only "block"
    rematerialises a block outside a stack (see the module's docstring).
    """
    if remat != "block":
        return sharding.constrain_batch(block(x))
    graphdef, state = nnx.split(block)

    def run(state, x):
        module = nnx.merge(graphdef, state)
        return module(x), nnx.state(module)

    y, state = _checkpointed(run, remat)(state, x)
    nnx.update(block, state)
    return sharding.constrain_batch(y)


class BlockStack(nnx.Module):
    """count blocks of one shape run by jax.lax.scan, their parameters stacked on axis 0.

    Args:
      make_block: returns one block from an nnx.Rngs (called abstractly once, then under
        jax.vmap over count parameter keys). Its __call__(x, drop_path=None) takes the
        residual branch's drop path as a function when the stack has drop-path rates.
      count: the number of blocks.
      drop_path_rates: one stochastic-depth rate per block (scanned with the blocks), or
        empty for none.
      remat: the rematerialisation policy of each block (see REMAT_POLICIES).
      unroll: run the blocks unrolled rather than as one loop; None: unrolled on CPU only
        (see the module's docstring). The parameters are the same either way.
    """

    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        count: int,
        *,
        rngs: nnx.Rngs,
        drop_path_rates: Sequence[float] = (),
        remat: str = "none",
        unroll: bool | None = None,
    ):
        if count < 1:
            raise ValueError(f"count={count}: a BlockStack needs at least one block")
        rates = tuple(float(r) for r in drop_path_rates)
        if rates and len(rates) != count:
            raise ValueError(f"{len(rates)} drop-path rates for {count} blocks: give one per block")
        self.count = count
        self.remat = check_remat(remat)
        self.unroll = unroll
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_block(nnx.Rngs(0))))
        keys = jax.random.split(rngs.params(), count)
        states = jax.vmap(lambda key: nnx.state(make_block(nnx.Rngs(key))))(keys)
        self.stacked = nnx.merge(graphdef, states)  # the attribute name is sharding.STACKED
        self.rates = rates if any(rates) else ()
        # One stream for the whole stack: each call draws one key and splits it per block.
        self.drop_path = DropPath(max(self.rates), rngs=rngs) if self.rates else nnx.data(None)

    def __len__(self) -> int:
        return self.count

    def __call__(self, x: jax.Array) -> jax.Array:
        graphdef, stats, params = nnx.split(self.stacked, nnx.BatchStat, ...)
        dropping = self.drop_path is not None and not self.drop_path.deterministic
        keys = jax.random.split(self.drop_path.rngs(), self.count) if dropping else None
        rates = jnp.asarray(self.rates, jnp.float32) if dropping else None

        def body(x, scanned):
            stats, params, key, rate = scanned
            block = nnx.merge(graphdef, stats, params)
            kwargs = {"drop_path": functools.partial(drop_samples, rate=rate, key=key)} if dropping else {}
            y = sharding.constrain_batch(block(x, **kwargs))
            return y, nnx.state(block, nnx.BatchStat)

        body = _checkpointed(body, self.remat, prevent_cse=False)  # a scan body needs no CSE guard
        unroll = self.unroll if self.unroll is not None else jax.default_backend() == "cpu"
        x, stats = jax.lax.scan(body, x, (stats, params, keys, rates), unroll=bool(unroll))
        nnx.update(self.stacked, stats)
        return x


def stage_blocks(
    make_block: Callable[..., nnx.Module],
    count: int,
    *,
    first: int = 0,
    rngs: nnx.Rngs,
    scan: bool = True,
    drop_path_rates: Sequence[float] = (),
    remat: str = "none",
    unroll: bool | None = None,
) -> list[nnx.Module]:
    """Returns the blocks first..count-1 of a stage: one BlockStack when scan and there are 2
    or more of them, else separate blocks (with their own drop path).

    make_block(rngs, drop_path_rate) returns one block; drop_path_rates has one rate per
    block of the stage (or is empty).
    """
    rates = list(drop_path_rates) or [0.0] * count
    if scan and count - first >= 2:
        return [
            BlockStack(
                lambda r: make_block(r, 0.0),
                count - first,
                rngs=rngs,
                drop_path_rates=rates[first:] if any(rates[first:]) else (),
                remat=remat,
                unroll=unroll,
            )
        ]
    return [make_block(rngs, rates[b]) for b in range(first, count)]


def run_stage(blocks: Sequence[nnx.Module], x: jax.Array, remat: str) -> jax.Array:
    """Returns x through a stage's blocks (BlockStacks apply their own remat policy)."""
    for block in blocks:
        x = block(x) if isinstance(block, BlockStack) else apply_block(block, x, remat)
    return x
