"""Training state: abstract init (``jax.eval_shape``) -> shardings -> ``jax.jit(init, out_shardings)``.

The abstract state with shardings attached is also the Orbax restore target, so a checkpoint is
restored straight into the layout of whatever mesh the restoring job has.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model.config import ModelConfig
from free_transformer_jax.model.transformer import init_params

# rng purposes, folded into the seed's key: one independent stream each (parameter init; the
# latent noise of training steps, folded with the step)
PARAMS, LATENT = 0, 1


def purpose_key(seed: int, purpose: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), purpose)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def abstract_params(cfg: ModelConfig) -> Any:
    """Boxed (logically annotated) parameter shapes; nothing is allocated."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh
                    ) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings) — the abstract state has its sharding on every leaf."""
    boxed = abstract_params(cfg)
    p_shardings = shard_lib.param_shardings(boxed, mesh)
    params = nn.meta.unbox(boxed)
    opt_state = jax.eval_shape(tx.init, params)
    rep = shard_lib.replicated(mesh)
    # optimizer leaves that mirror a parameter take its sharding; the rest (counts) replicate
    o_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_state, p_shardings,
                                        transform_non_params=lambda _: rep)
    shardings = TrainState(step=rep, params=p_shardings, opt_state=o_shardings)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
    with_sharding = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 abstract, shardings)
    return with_sharding, shardings


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
               params: Any | None = None, shardings: TrainState | None = None
               ) -> tuple[TrainState, TrainState]:
    """(state, shardings): a freshly initialised state created directly in its sharded layout
    (never whole on one device). ``params`` (e.g. converted from a HF checkpoint) replaces the
    random init; ``shardings`` (from :func:`state_shardings`) saves recomputing them."""
    if shardings is None:
        _, shardings = state_shardings(cfg, tx, mesh)

    def init(key):
        p = nn.meta.unbox(init_params(cfg, key))
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    def from_params(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    with shard_lib.mesh_context(mesh):
        if params is None:
            state = jax.jit(init, out_shardings=shardings)(purpose_key(seed, PARAMS))
        else:
            params = jax.device_put(params, shardings.params)
            state = jax.jit(from_params, out_shardings=shardings)(params)
    return state, shardings
