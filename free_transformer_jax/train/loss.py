"""The training objective (BUILD_NOTES.md, "Model"): mean next-token CE
+ kl_weight * mean_t max(0, KL_t - kappa) (the free-bits term, ``model.latent.free_bits_kl``)
[+ aggregate_kl_weight * ``model.latent.aggregate_kl``, off by default: not in the paper; with
``model.aggregate_kl_ramp_steps`` its weight rises linearly from 0 over those steps]; with
``model.free_bits_scope="batch"`` (not the paper's) the hinge is on each position's batch-mean KL.

A batch is a dict of (B, T) arrays: ``inputs``, ``targets`` and optionally ``segment_ids`` (0 =
padding), ``positions`` and ``loss_mask`` (1 where the target is scored). Without ``loss_mask`` the
targets of non-padding positions are scored. The KL is averaged over non-padding positions (every
real position has a latent, including a document's last one whose target is not scored).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from free_transformer_jax.model import latent as latent_lib
from free_transformer_jax.model.config import ModelConfig

Array = jax.Array


def token_masks(batch: Mapping[str, Array]) -> tuple[Array, Array]:
    """(target mask, latent mask), float32 (B, T)."""
    inputs = batch["inputs"]
    seg = batch.get("segment_ids")
    latent_mask = jnp.ones(inputs.shape, jnp.float32) if seg is None else (seg > 0).astype(jnp.float32)
    target_mask = batch.get("loss_mask")
    target_mask = latent_mask if target_mask is None else target_mask.astype(jnp.float32) * latent_mask
    return target_mask, latent_mask


def cross_entropy(logits_BTV: Array, targets_BT: Array) -> Array:
    """Per-token CE in nats (float32), via a stable log-softmax."""
    logits = logits_BTV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_z - target_logit


def masked_mean(x: Array, mask: Array, denominator: Array | None = None) -> Array:
    """sum(x * mask) / denominator (default: sum(mask)); with a global denominator the results of
    micro-batches add up to the whole batch's mean."""
    denominator = jnp.sum(mask) if denominator is None else denominator
    return jnp.sum(x * mask) / jnp.maximum(denominator, 1.0)


def aggregate_kl_weight(cfg: ModelConfig, step: Array | int | None) -> Array | float:
    """The aggregate-KL weight at ``step``: ``cfg.aggregate_kl_weight``, or with
    ``cfg.aggregate_kl_ramp_steps = R > 0`` that weight times min(1, step / R)."""
    if not cfg.aggregate_kl_ramp_steps:
        return cfg.aggregate_kl_weight
    if step is None:
        raise ValueError("model.aggregate_kl_ramp_steps > 0 needs the optimizer step: pass step= "
                         "to loss_and_metrics")
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / cfg.aggregate_kl_ramp_steps, 1.0)
    return cfg.aggregate_kl_weight * frac


def loss_and_metrics(cfg: ModelConfig, logits_BTV: Array, aux: Mapping[str, Any],
                     batch: Mapping[str, Array], denominators: tuple[Array, Array] | None = None,
                     step: Array | int | None = None) -> tuple[Array, dict[str, Array]]:
    """Returns (loss, metrics). Metrics are scalars: loss, ce, kl_nats, kl_bits, kl_term,
    frac_above_kappa (baseline: the KL entries are zeros so every run logs the same keys), and
    ``n_tokens`` (scored targets).

    ``denominators`` = (scored targets, latent positions) of the whole batch, when this call sees
    one micro-batch of it: every returned mean is then that micro-batch's share of the whole
    batch's mean, so shares sum to exactly the whole-batch values. ``step`` (the optimizer step,
    needed only with ``cfg.aggregate_kl_ramp_steps``) sets the ramped aggregate-KL weight.
    """
    target_mask, latent_mask = token_masks(batch)
    ce_den, kl_den = (None, None) if denominators is None else denominators
    ce = masked_mean(cross_entropy(logits_BTV, batch["targets"]), target_mask, ce_den)
    zero = jnp.zeros((), jnp.float32)
    kl_mean, kl_term, frac_above = zero, zero, zero
    # terms computed over a micro-batch's own rows (batch means) count with its share of positions
    share = 1.0 if kl_den is None else jnp.sum(latent_mask) / jnp.maximum(kl_den, 1.0)
    if cfg.latent and aux.get("kl") is not None:
        kl = aux["kl"]
        kl_mean = masked_mean(kl, latent_mask, kl_den)
        if cfg.free_bits_scope == "batch":
            kl_term = share * latent_lib.batch_free_bits_kl(kl, cfg.kappa_nats, latent_mask)
        else:
            kl_term = latent_lib.free_bits_kl(kl, cfg.kappa_nats, latent_mask, kl_den)
        frac_above = masked_mean((kl > cfg.kappa_nats).astype(jnp.float32), latent_mask, kl_den)
    loss = ce + cfg.kl_weight * kl_term
    agg = None
    if cfg.latent and cfg.aggregate_kl_weight and aux.get("bit_logits") is not None:
        agg = share * latent_lib.aggregate_kl(aux["bit_logits"], latent_mask, cfg.aggregate_kl_form)
        loss = loss + aggregate_kl_weight(cfg, step) * agg
    metrics = {"loss": loss, "ce": ce, "kl_nats": kl_mean, "kl_bits": kl_mean / math.log(2.0),
               "kl_term": kl_term, "frac_above_kappa": frac_above,
               "n_tokens": jnp.sum(target_mask)}
    if agg is not None:
        metrics["aggregate_kl_bits"] = agg / math.log(2.0)
    return loss, metrics
