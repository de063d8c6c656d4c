"""The jitted, sharded train step: loss, gradients (optionally accumulated over micro-batches with
``lax.scan``), the optimizer update.

``jax.jit`` with ``in_shardings``/``out_shardings`` is what ``pjit`` became: this is the pjit train
step. The state is donated, so parameters and optimizer state are updated in place.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model.config import ModelConfig
from free_transformer_jax.model.transformer import FreeTransformer
from free_transformer_jax.train.loss import aggregate_kl_weight, loss_and_metrics, token_masks
from free_transformer_jax.train.state import LATENT, TrainState, purpose_key

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def forward_loss(cfg: ModelConfig, params: Any, batch: Batch, key: jax.Array, row_ids: jax.Array,
                 denominators=None, step=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Posterior-Z forward pass and the training objective on one (micro-)batch."""
    logits, aux = FreeTransformer(cfg).apply(
        {"params": params}, batch["inputs"], latent="posterior",
        segment_ids=batch.get("segment_ids"), positions=batch.get("positions"), row_ids=row_ids,
        rngs={"latent": key})
    return loss_and_metrics(cfg, logits, aux, batch, denominators, step)


def _micro_batches(batch: Batch, n: int, mesh: Mesh | None) -> Batch:
    """(B, ...) -> (n, B/n, ...), micro-batch i = rows i, i+n, i+2n, ...: each device's rows are
    spread evenly over micro-batches, so slicing one moves no data between devices."""
    def split(x):
        b = x.shape[0]
        y = jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)
        if mesh is not None:
            spec = P(None, shard_lib.BATCH_AXES, *([None] * (x.ndim - 1)))
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
        return y
    return jax.tree.map(split, batch)


def grads_and_metrics(cfg: ModelConfig, params: Any, batch: Batch, key: jax.Array, grad_accum: int,
                      mesh: Mesh | None = None, step=None) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of the whole batch's loss; with ``grad_accum > 1`` it is accumulated over strided
    micro-batches, and equals the single-pass gradient (same Z: noise is keyed by row id; same
    normalisation: every micro-batch divides by the whole batch's token counts)."""
    b = batch["inputs"].shape[0]
    target_mask, latent_mask = token_masks(batch)
    denominators = (jnp.sum(target_mask), jnp.sum(latent_mask))
    row_ids = jnp.arange(b, dtype=jnp.int32)
    grad_fn = jax.value_and_grad(forward_loss, argnums=1, has_aux=True)
    if grad_accum == 1:
        (_, metrics), grads = grad_fn(cfg, params, batch, key, row_ids, denominators, step)
        return grads, metrics

    micro = _micro_batches(batch, grad_accum, mesh)
    micro_rows = _micro_batches({"r": row_ids}, grad_accum, None)["r"]

    def body(acc, xs):
        mb, rows = xs
        (_, m), g = grad_fn(cfg, params, mb, key, rows, denominators, step)
        return jax.tree.map(jnp.add, acc, (g, m)), None

    zero_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zero_m = jax.eval_shape(lambda: grad_fn(cfg, params, jax.tree.map(lambda x: x[0], micro), key,
                                            micro_rows[0], denominators, step)[0][1])
    zero_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_m)
    (grads, metrics), _ = jax.lax.scan(body, (zero_g, zero_m), (micro, micro_rows))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, metrics


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, grad_accum: int,
                    schedule: Callable[[jax.Array], jax.Array] | None = None,
                    mesh: Mesh | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The un-jitted step ``(state, batch) -> (state, metrics)``; see :func:`jit_train_step`."""
    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(purpose_key(seed, LATENT), state.step)  # built inside: AOT-safe
        grads, metrics = grads_and_metrics(cfg, state.params, batch, key, grad_accum, mesh, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(params))
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        if cfg.latent and cfg.aggregate_kl_weight and cfg.aggregate_kl_ramp_steps:
            metrics["aggregate_kl_weight"] = aggregate_kl_weight(cfg, state.step)  # float32 array
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   shardings: TrainState, seed: int, grad_accum: int,
                   schedule: Callable | None = None,
                   batch_shardings: dict[str, NamedSharding] | None = None):
    """``jax.jit`` with explicit in/out shardings and the state donated (default batch layout:
    every field of :data:`BATCH_KEYS` over the batch axes). Call it inside
    ``sharding.mesh_context(mesh)``; ``train.program.build_program`` is the usual way in."""
    step = make_train_step(cfg, tx, seed, grad_accum, schedule, mesh)
    if batch_shardings is None:
        batch_shardings = {k: shard_lib.batch_sharding(mesh) for k in BATCH_KEYS}
    return jax.jit(step, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, shard_lib.replicated(mesh)), donate_argnums=(0,))

