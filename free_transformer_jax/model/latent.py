"""The latent path: Binary Mapper + post-sampler, and the KL to the uniform prior with free bits
(BUILD_NOTES.md, "Model" and its "The fused latent path").

Codes: H independent bits per position, ``code = sum_h bit_h * 2**h`` (bit 0 least significant),
``C = 2**H`` codes. The post-sampler is a ``C x D`` table ``W``; the mapper's output
``Z = Y + G - stop_gradient(G)`` (``Y`` the one-hot of the sampled code, ``G`` the full probability
vector over codes) is multiplied by ``W``.

Two implementations of ``Z @ W``, selected by ``ModelConfig.latent_impl``:
  * ``dense``: that formula, autodiffed. Builds tokens x C tensors: the reference, small H only.
  * ``fused``: one ``jax.custom_vjp``. Forward is a gather ``W[code]``; backward computes the exact
    same gradients in float32, chunked over positions (and optionally codes) so that no
    tokens x C tensor is ever whole.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model.config import AGGREGATE_KL_FORMS, AGGREGATE_KL_MAX_BITS

Array = jax.Array
LN2 = math.log(2.0)
# The fused backward's working set: each positions x codes float32 tensor of one chunk is kept near
# this size (three are live at once). Measured on the CPU bench shape (BUILD_NOTES "The decoder
# at its floor on a CPU"): smaller chunks cost time (more loop steps), larger ones memory
# without gaining time.
LATENT_CHUNK_BYTES = 32 * 2**20


# Codes and bits ----------------------------------------------------------------------------------
def bit_table(start: int | Array, n: int, n_bits: int) -> Array:
    """(n, H) float32 table U with U[i, h] = bit h of code (start + i)."""
    codes = start + jnp.arange(n, dtype=jnp.int32)
    return ((codes[:, None] >> jnp.arange(n_bits, dtype=jnp.int32)[None, :]) & 1).astype(jnp.float32)


def bits_to_codes(bits_BTH: Array) -> Array:
    """Integer codes from bits, bit 0 least significant."""
    n_bits = bits_BTH.shape[-1]
    weights = (1 << jnp.arange(n_bits, dtype=jnp.int32))
    return jnp.sum(bits_BTH.astype(jnp.int32) * weights, axis=-1)


def codes_to_bits(codes_BT: Array, n_bits: int) -> Array:
    return (codes_BT[..., None] >> jnp.arange(n_bits, dtype=jnp.int32)) & 1


def row_uniforms(key: Array, shape: tuple[int, ...], row_ids: Array | None = None) -> Array:
    """Uniforms of ``shape`` (B, ...) where row b depends only on ``(key, row_ids[b])``: the same
    sequence gets the same noise however the batch is split (micro-batches, meshes)."""
    rows = jnp.arange(shape[0], dtype=jnp.int32) if row_ids is None else row_ids
    return jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), shape[1:]))(rows)


def sample_codes(key: Array, logits_BTH: Array, row_ids: Array | None = None) -> Array:
    """Samples each bit with P(bit = 1) = sigmoid(logit) (never a threshold) and packs the codes."""
    probs = jax.nn.sigmoid(logits_BTH.astype(jnp.float32))
    return bits_to_codes(row_uniforms(key, logits_BTH.shape, row_ids) < probs)


def prior_codes(key: Array, shape: tuple[int, ...], n_bits: int, row_ids: Array | None = None) -> Array:
    """Codes drawn uniformly from {0 .. 2**H - 1} (the prior used at generation)."""
    u = row_uniforms(key, shape, row_ids)
    return jnp.minimum((u * 2**n_bits).astype(jnp.int32), 2**n_bits - 1)


def log_code_probs(logits_NH: Array, bits_CH: Array) -> Array:
    """log G: (N, C) log-probabilities of the codes whose bits are the rows of ``bits_CH``."""
    l32 = logits_NH.astype(jnp.float32)
    return l32 @ bits_CH.T - jnp.sum(jax.nn.softplus(l32), axis=-1, keepdims=True)


# KL to the uniform prior -------------------------------------------------------------------------
def kl_per_token(logits_BTH: Array) -> Array:
    """Exact KL(Q(Z_t | ...) || uniform over C codes) in nats: sum_h (ln 2 - Hb(sigmoid(l_h)))."""
    l = logits_BTH.astype(jnp.float32)
    p = jax.nn.sigmoid(l)
    entropy = p * jax.nn.softplus(-l) + (1.0 - p) * jax.nn.softplus(l)  # binary entropy, nats
    return jnp.sum(LN2 - entropy, axis=-1)


def free_bits_hinge(kl_BT: Array, kappa_nats: float) -> Array:
    """max(0, KL_t - kappa) per token."""
    return jnp.maximum(kl_BT - kappa_nats, 0.0)


def free_bits_kl(kl_BT: Array, kappa_nats: float, mask_BT: Array | None = None,
                 denominator: Array | None = None) -> Array:
    """The free-bits KL term of the training loss: mean_t max(0, KL_t - kappa), the hinge applied
    per token, then averaged over the positions where ``mask_BT`` is 1. ``denominator`` (default:
    the mask's sum) replaces the count, so micro-batches divided by the whole batch's count add up
    to the whole batch's term (``train.step.grads_and_metrics``)."""
    hinge = free_bits_hinge(kl_BT, kappa_nats)
    mask = jnp.ones_like(hinge) if mask_BT is None else mask_BT.astype(jnp.float32)
    denominator = jnp.sum(mask) if denominator is None else denominator
    return jnp.sum(hinge * mask) / jnp.maximum(denominator, 1.0)


def _row_mean(x_BT: Array, mask_BT: Array) -> tuple[Array, Array]:
    """(mean over the rows where ``mask_BT`` is 1 at each position, shape (T, ...); the (T,) count
    of those rows). ``x_BT`` may carry trailing axes."""
    rows = jnp.sum(mask_BT, axis=0)
    total = jnp.einsum("bt,bt...->t...", mask_BT, x_BT)
    return total / jnp.maximum(rows, 1.0).reshape(rows.shape + (1,) * (total.ndim - 1)), rows


def _position_mean(v_T: Array, rows_T: Array) -> Array:
    """Mean of ``v_T`` over the positions with at least one row."""
    present = (rows_T > 0).astype(jnp.float32)
    return jnp.sum(v_T * present) / jnp.maximum(jnp.sum(present), 1.0)


def _mask_or_ones(mask_BT: Array | None, shape: tuple[int, int]) -> Array:
    return jnp.ones(shape, jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)


def aggregate_posterior(logits_BTH: Array, mask_BT: Array | None = None) -> Array:
    """(T, C): at each position, the posterior over all 2**H codes averaged over the rows (where
    ``mask_BT`` is 1). Holds a (B, T, 2**H) float32 tensor, so H <= 12."""
    l32 = logits_BTH.astype(jnp.float32)
    b, t, h = l32.shape
    if h > AGGREGATE_KL_MAX_BITS:
        raise ValueError(f"the aggregate posterior over codes needs H <= {AGGREGATE_KL_MAX_BITS}, "
                         f"not {h}; use model.aggregate_kl_form='bits'")
    probs = jnp.exp(log_code_probs(l32.reshape(b * t, h), bit_table(0, 2**h, h))).reshape(b, t, -1)
    return _row_mean(probs, _mask_or_ones(mask_BT, (b, t)))[0]


def aggregate_kl(logits_BTH: Array, mask_BT: Array | None = None, form: str = "codes") -> Array:
    """KL(q_t || uniform) in nats, averaged over positions, where q_t is the posterior averaged over
    the batch's rows at position t (the aggregate posterior that prior samples should look like).
    Not in the paper: an ablation knob (``model.aggregate_kl_weight``; BUILD_NOTES, "Synthetic
    ablations"). ``form="codes"``: exact over all 2**H codes (H <= 12); ``"bits"``: the sum of the
    per-bit marginals' KLs, a lower bound (it misses the correlation between bits) at any H."""
    l32 = logits_BTH.astype(jnp.float32)
    b, t, h = l32.shape
    mask = _mask_or_ones(mask_BT, (b, t))
    xlogx = jax.scipy.special.xlogy
    if form == "codes":
        q_TC = aggregate_posterior(l32, mask)
        kl_T = jnp.sum(xlogx(q_TC, q_TC), axis=-1) + h * LN2
    elif form == "bits":
        p_TH, _ = _row_mean(jax.nn.sigmoid(l32), mask)
        kl_T = jnp.sum(xlogx(p_TH, p_TH) + xlogx(1.0 - p_TH, 1.0 - p_TH) + LN2, axis=-1)
    else:
        raise ValueError(f"aggregate_kl form={form!r}: expected one of {AGGREGATE_KL_FORMS}")
    return _position_mean(kl_T, jnp.sum(mask, axis=0))


def batch_free_bits_kl(kl_BT: Array, kappa_nats: float, mask_BT: Array | None = None) -> Array:
    """Free bits with the batch average inside the hinge (Kingma et al. 2016's form):
    mean_t max(0, mean_b KL_bt - kappa), over positions with a latent in some row. Not the paper's
    per-token form (:func:`free_bits_kl`): an ablation knob (``model.free_bits_scope="batch"``)
    under which one record may spend more than kappa at a position as long as the batch's
    average there stays below it."""
    mean_T, rows = _row_mean(kl_BT, _mask_or_ones(mask_BT, kl_BT.shape))
    return _position_mean(free_bits_hinge(mean_T, kappa_nats), rows)


# Z @ W: the dense reference ----------------------------------------------------------------------
def dense_post_sampler(logits_BTH: Array, table_CD: Array, codes_BT: Array) -> Array:
    """``(Y + G - stop_gradient(G)) @ W`` exactly as written in the paper (Eq. 8)."""
    n_codes, n_bits = table_CD.shape[0], logits_BTH.shape[-1]
    g_full = jnp.exp(log_code_probs(logits_BTH, bit_table(0, n_codes, n_bits)))
    y = jax.nn.one_hot(codes_BT, n_codes, dtype=jnp.float32)
    z = y + g_full - jax.lax.stop_gradient(g_full)
    return jnp.einsum("btc,cd->btd", z, table_CD.astype(jnp.float32))


# Z @ W: the fused custom_vjp ---------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_post_sampler(logits_BTH: Array, table_CD: Array, codes_BT: Array,
                       token_chunk: int = -1, code_chunk: int = 0) -> Array:
    """Same value and gradients as :func:`dense_post_sampler`; forward is ``W[codes]``."""
    return jnp.take(table_CD, codes_BT, axis=0).astype(jnp.float32)


def _fused_fwd(logits, table, codes, token_chunk, code_chunk):
    out = fused_post_sampler(logits, table, codes, token_chunk, code_chunk)
    return out, (logits, table, codes)


def _chunk_logit_grad(l_BTH: Array, g_BTD: Array, table_CD: Array, code_chunk: int) -> Array:
    """dL/dl for one chunk of positions: (c*G) @ U - sigmoid(l) * sum_d (c*G)_d, c = g @ W^T."""
    n_codes, n_bits = table_CD.shape[0], l_BTH.shape[-1]
    block = code_chunk or n_codes
    l_BTH = l_BTH.astype(jnp.float32)
    softplus_sum = jnp.sum(jax.nn.softplus(l_BTH), axis=-1, keepdims=True)

    def partial_sums(start, table_blk):
        bits = bit_table(start, block, n_bits)  # (block, H)
        c = jnp.einsum("btd,cd->btc", g_BTD, table_blk.astype(jnp.float32))
        weighted = c * jnp.exp(jnp.einsum("bth,ch->btc", l_BTH, bits) - softplus_sum)
        return jnp.einsum("btc,ch->bth", weighted, bits), jnp.sum(weighted, axis=-1, keepdims=True)

    if block == n_codes:
        acc, total = partial_sums(0, table_CD)
    else:
        blocks = table_CD.reshape(n_codes // block, block, table_CD.shape[1])

        def body(carry, xs):
            i, table_blk = xs
            a, s = partial_sums(i * block, table_blk)
            return (carry[0] + a, carry[1] + s), None

        init = (jnp.zeros(l_BTH.shape, jnp.float32), jnp.zeros(l_BTH.shape[:-1] + (1,), jnp.float32))
        (acc, total), _ = jax.lax.scan(body, init, (jnp.arange(n_codes // block), blocks))
    return acc - jax.nn.sigmoid(l_BTH) * total


def rows_per_device(rows: int) -> int:
    """The rows of a (B, ...) activation each device holds under the current mesh (its batch
    axes, from the logical axis rules); ``rows`` outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return rows
    return max(1, rows // shard_lib.axis_size(mesh, nn.logical_to_mesh_axes(("act_batch",))[0]))


def auto_token_chunk(rows: int, seq_len: int, n_codes: int, code_chunk: int = 0) -> int:
    """Positions per chunk of the fused backward: the largest power of two whose
    (rows x chunk x codes) float32 tensor fits ``LATENT_CHUNK_BYTES`` (at least 1, at most the
    sequence); ``rows`` are one device's."""
    per_position = rows * (code_chunk or n_codes) * 4
    chunk = 1
    while chunk * 2 * per_position <= LATENT_CHUNK_BYTES and chunk < seq_len:
        chunk *= 2
    return min(chunk, seq_len)


def _fused_bwd(token_chunk, code_chunk, res, g_BTD):
    logits, table, codes = res
    g32 = g_BTD.astype(jnp.float32)
    b, t, d = g32.shape
    # dW: the forward value of G - sg(G) is zero, so only the sampled rows receive gradient.
    # The zeros it is scattered into are made from g (0 * g[0, 0, 0], which XLA does not fold
    # away), so no scheduler can allocate this table-sized buffer before the backward pass
    # reaches it; a plain constant was allocated at the step's start and kept live through the
    # whole forward pass (+128 MiB of peak at configs/bench_cpu.py).
    zero = g32[0, 0, 0] * 0.0
    d_table = jnp.broadcast_to(zero, table.shape).at[codes.reshape(-1)].add(g32.reshape(-1, d))
    # dl: chunked along the sequence (the batch axis stays whole so its sharding is untouched).
    if token_chunk < 0:
        token_chunk = auto_token_chunk(rows_per_device(b), t, table.shape[0], code_chunk)
    chunk = min(token_chunk or t, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    l_pad = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
    g_pad = jnp.pad(g32, ((0, 0), (0, pad), (0, 0)))
    if n_chunks == 1:
        d_logits = _chunk_logit_grad(l_pad, g_pad, table, code_chunk)
    else:
        to_chunks = lambda a: jnp.moveaxis(a.reshape(b, n_chunks, chunk, a.shape[-1]), 1, 0)
        d_chunks = jax.lax.map(lambda xs: _chunk_logit_grad(xs[0], xs[1], table, code_chunk),
                               (to_chunks(l_pad), to_chunks(g_pad)))
        d_logits = jnp.moveaxis(d_chunks, 0, 1).reshape(b, n_chunks * chunk, -1)
    d_logits = d_logits[:, :t].astype(logits.dtype)
    return d_logits, d_table.astype(table.dtype), None


fused_post_sampler.defvjp(_fused_fwd, _fused_bwd)
