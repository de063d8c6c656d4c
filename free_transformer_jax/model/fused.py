"""Hand-written backward passes for the two places where XLA's autodiff spends more time moving
data than multiplying (measured on a CPU, BUILD_NOTES "The decoder at its floor on a CPU"):

* :func:`swiglu`: the SwiGLU MLP. Autodiff writes ``silu'(gate) * ...`` straight into the
  transposed layout the weight-gradient matmul wants, one strided store per element; here every
  elementwise product stays in its natural (tokens, features) layout and the weight gradients are
  plain ``x^T @ dy`` contractions.
* :func:`blocked_attention` (``model.attention_impl="blocked"``): softmax attention computed
  ``block`` queries at a time against only the keys they can see (a causal block skips the keys
  after it), saving only (q, k, v, output, log-sum-exp) for the backward pass, as flash attention
  does, instead of the T x S probabilities. The backward pass recomputes each block's scores
  transposed, keys x (group, query), the layout its three gradient products read without a
  transpose, each one matmul per (row, kv head).

Both compute exactly what autodiff of the plain formulas computes (tests/test_fused.py compares
values and gradients at 1e-5); only the order of operations and the layouts differ.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from free_transformer_jax.model.masking import NEG_INF, attention_mask

Array = jax.Array


# SwiGLU ------------------------------------------------------------------------------------------
@jax.custom_vjp
def swiglu(x_BTD: Array, w_gate_DF: Array, w_up_DF: Array, w_down_FD: Array) -> Array:
    """``down(silu(x @ gate) * (x @ up))``; weights already in the compute dtype."""
    return _swiglu_fwd(x_BTD, w_gate_DF, w_up_DF, w_down_FD)[0]


_MLP_AXES = ("act_batch", "act_seq", "act_mlp")


def _swiglu_fwd(x, w_gate, w_up, w_down):
    # gate and up as one matmul against the two weights stacked on a new (unsharded) axis
    both = jnp.einsum("btd,dcf->btcf", x, jnp.stack([w_gate, w_up], axis=1))
    gate = nn.with_logical_constraint(both[:, :, 0], _MLP_AXES)
    up = nn.with_logical_constraint(both[:, :, 1], _MLP_AXES)
    hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
    return jnp.einsum("btf,fd->btd", hidden, w_down), (x, gate, up, w_gate, w_up, w_down)


def _swiglu_bwd(res, dy):
    x, gate, up, w_gate, w_up, w_down = res
    g32, u32 = gate.astype(jnp.float32), up.astype(jnp.float32)
    sig = jax.nn.sigmoid(g32)
    silu = g32 * sig
    hidden = (silu * u32).astype(x.dtype)
    d_hidden = nn.with_logical_constraint(jnp.einsum("btd,fd->btf", dy, w_down), _MLP_AXES)
    d_hidden = d_hidden.astype(jnp.float32)
    d_up = d_hidden * silu
    d_gate = d_hidden * u32 * sig * (1.0 + g32 * (1.0 - sig))
    d_both = jnp.stack([d_gate, d_up], axis=2).astype(x.dtype)
    dx = jnp.einsum("btcf,dcf->btd", d_both, jnp.stack([w_gate, w_up], axis=1))
    dw_both = jnp.einsum("btd,btcf->dcf", x, d_both)
    # as (dy^T hidden)^T: the operand the matmul transposes is then dy (D wide), not hidden (F wide)
    dw_down = jnp.einsum("btd,btf->df", dy, hidden).T
    return dx, dw_both[:, 0], dw_both[:, 1], dw_down


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# Blocked attention -------------------------------------------------------------------------------
def _blocks(t: int, block: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) per block: a causal block sees keys up to its end."""
    return [(q0, min(q0 + block, t), min(q0 + block, t) if causal else t)
            for q0 in range(0, t, block)]


def _visible(seg_q: Array, seg_k: Array, q0: int, causal: bool) -> Array:
    """(B, 1, 1, S, c) bool, keys x queries: ``masking.attention_mask`` of queries q0 .. q0 + c."""
    return jnp.swapaxes(attention_mask(seg_q, q0 + jnp.arange(seg_q.shape[1]), seg_k, causal),
                        -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_attention(q_BTKGD: Array, k_BSKD: Array, v_BSKD: Array, seg_BT: Array, causal: bool,
                      block: int) -> Array:
    """Attention of ``layers.dot_product_attention`` without a cache (queries and keys of one
    length, segment ids ``seg_BT`` for both): grouped queries (B, T, K, G, D), keys/values
    (B, T, K, D); scores, softmax and the backward pass in float32."""
    return _attn_fwd(q_BTKGD, k_BSKD, v_BSKD, seg_BT, causal, block)[0]


def _attn_fwd(q, k, v, seg, causal, block):
    scale = q.shape[-1] ** -0.5
    q_h = jnp.transpose(q, (0, 2, 3, 1, 4))  # B K G T D
    k_h = jnp.transpose(k, (0, 2, 1, 3))  # B K S D
    v_h = jnp.transpose(v, (0, 2, 1, 3))
    outs, lses = [], []
    for q0, q1, s1 in _blocks(q.shape[1], block, causal):
        s = jnp.einsum("bkgtd,bksd->bkgts", q_h[:, :, :, q0:q1], k_h[:, :, :s1],
                       preferred_element_type=jnp.float32) * scale
        mask = jnp.swapaxes(_visible(seg[:, q0:q1], seg[:, :s1], q0, causal), -1, -2)
        s = jnp.where(mask, s, NEG_INF)
        peak = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - peak)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v_h[:, :, :s1],
                       preferred_element_type=jnp.float32)
        outs.append((o / total).astype(q.dtype))
        lses.append((peak + jnp.log(total))[..., 0])
    o_h = jnp.concatenate(outs, axis=3)
    lse = jnp.concatenate(lses, axis=3)  # B K G T
    return jnp.transpose(o_h, (0, 3, 1, 2, 4)), (q_h, k_h, v_h, o_h, lse, seg)


def _attn_bwd(causal, block, res, d_out):
    q_h, k_h, v_h, o_h, lse, seg = res
    b, kvh, g, t, d = q_h.shape
    scale = d ** -0.5
    do_h = jnp.transpose(d_out, (0, 2, 3, 1, 4)).astype(jnp.float32)  # B K G T D
    delta = jnp.sum(do_h * o_h.astype(jnp.float32), axis=-1)  # B K G T
    f32 = lambda a: a.astype(jnp.float32)
    dq_parts = []
    dk = jnp.zeros(k_h.shape, jnp.float32)
    dv = jnp.zeros(v_h.shape, jnp.float32)
    for q0, q1, s1 in _blocks(t, block, causal):
        n = q1 - q0
        # one block's queries of every group as one axis: B K (G c) D
        q_b = f32(q_h[:, :, :, q0:q1]).reshape(b, kvh, g * n, d)
        do_b = do_h[:, :, :, q0:q1].reshape(b, kvh, g * n, d)
        k_b, v_b = f32(k_h[:, :, :s1]), f32(v_h[:, :, :s1])
        # keys x (group, query): the layout dV = P^T dO, dK = dS^T Q and dQ^T = K^T dS^T read
        # directly, each one matmul per (row, kv head)
        s_t = jnp.einsum("bksd,bkqd->bksq", k_b, q_b).reshape(b, kvh, s1, g, n) * scale
        mask = _visible(seg[:, q0:q1], seg[:, :s1], q0, causal)[:, :, 0, :, None, :]
        s_t = jnp.where(mask, s_t, NEG_INF)
        p_t = jnp.exp(s_t - lse[:, :, None, :, q0:q1]).reshape(b, kvh, s1, g * n)
        dv = dv.at[:, :, :s1].add(jnp.einsum("bksq,bkqd->bksd", p_t, do_b))
        dp_t = jnp.einsum("bksd,bkqd->bksq", v_b, do_b)
        ds_t = p_t * (dp_t - delta[:, :, :, q0:q1].reshape(b, kvh, 1, g * n)) * scale
        dk = dk.at[:, :, :s1].add(jnp.einsum("bksq,bkqd->bksd", ds_t, q_b))
        dq_parts.append(jnp.einsum("bksd,bksq->bkdq", k_b, ds_t).reshape(b, kvh, d, g, n))
    dq = jnp.transpose(jnp.concatenate(dq_parts, axis=-1), (0, 4, 1, 3, 2))  # B T K G D
    return (dq.astype(q_h.dtype), jnp.transpose(dk, (0, 2, 1, 3)).astype(k_h.dtype),
            jnp.transpose(dv, (0, 2, 1, 3)).astype(v_h.dtype), None)


blocked_attention.defvjp(_attn_fwd, _attn_bwd)
