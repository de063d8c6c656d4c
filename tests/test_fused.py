"""The hand-written backward passes of ``model/fused.py`` against autodiff of the plain formulas:
values and gradients in float32 to 1e-5, and in bfloat16 against the float32 reference to
bfloat16's precision."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_transformer_jax.model.config import attention_block
from free_transformer_jax.model.fused import blocked_attention, swiglu
from free_transformer_jax.model.layers import dot_product_attention

TOL = dict(atol=1e-5, rtol=1e-5)


def plain_swiglu(x, w_gate, w_up, w_down):
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def value_and_grads(fn, args, w):
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)
    return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=tuple(range(len(a))))(*a)))(*args)


def swiglu_args(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (2, 9, 16))
    ws = [jax.random.normal(k, s) * 0.5 for k, s in zip(keys[1:4], [(16, 24), (16, 24), (24, 16)])]
    w = jax.random.normal(keys[4], (2, 9, 16))
    return [a.astype(dtype) for a in [x] + ws], w


def test_swiglu_matches_autodiff():
    args, w = swiglu_args()
    out, grads = value_and_grads(swiglu, args, w)
    ref_out, ref_grads = value_and_grads(plain_swiglu, args, w)
    np.testing.assert_allclose(out, ref_out, **TOL)
    for name, g, r in zip(["x", "gate", "up", "down"], grads, ref_grads):
        assert float(jnp.max(jnp.abs(r))) > 0.1, name  # gradients of a size where an error shows
        np.testing.assert_allclose(g, r, err_msg=f"d{name}", **TOL)


def test_swiglu_in_bfloat16_keeps_its_dtype_and_bfloat16_precision():
    args, w = swiglu_args(jnp.bfloat16)
    out, grads = value_and_grads(swiglu, args, w)
    ref_out, ref_grads = value_and_grads(plain_swiglu, [a.astype(jnp.float32) for a in args], w)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    scale = lambda a: float(jnp.max(jnp.abs(a)))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=0.02 * scale(ref_out))
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=0.02 * scale(r))


def segments(t: int, packed: bool) -> jax.Array:
    """Row 0: three documents then padding (packed) or one document then padding; row 1 the same,
    rolled or shorter."""
    if packed:
        row = np.r_[np.full(t // 4, 1), np.full(t // 3, 2), np.full(t // 4, 3)]
        row = np.r_[row, np.zeros(t - len(row))]
        return jnp.asarray(np.stack([row, np.roll(row, 7)]), jnp.int32)
    return jnp.asarray(np.stack([np.r_[np.ones(t - 5), np.zeros(5)],
                                 np.r_[np.ones(t - 30), np.zeros(30)]]), jnp.int32)


# (causal, packed, kv heads, queries per kv head, length, block): blocks that divide the length and
# a last block that is shorter; one kv head (MQA) and grouped heads; the non-causal encoder case
CASES = [(True, True, 1, 2, 96, 32), (True, False, 2, 2, 100, 32), (False, True, 2, 3, 80, 32),
         (True, True, 2, 1, 64, 64), (False, False, 1, 1, 50, 64)]


@pytest.mark.parametrize("causal,packed,kv_heads,group,t,block", CASES)
def test_blocked_attention_matches_dense_autodiff(causal, packed, kv_heads, group, t, block):
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (2, t, kv_heads, group, 16))
    k = jax.random.normal(keys[1], (2, t, kv_heads, 16))
    v = jax.random.normal(keys[2], (2, t, kv_heads, 16))
    w = jax.random.normal(keys[3], q.shape)
    seg = segments(t, packed)
    ours = functools.partial(blocked_attention, seg_BT=seg, causal=causal, block=block)
    ref = lambda q, k, v: dot_product_attention(q, k, v, seg, jnp.arange(t), seg, causal,
                                                jnp.float32)
    out, grads = value_and_grads(lambda q, k, v: ours(q, k, v), (q, k, v), w)
    ref_out, ref_grads = value_and_grads(ref, (q, k, v), w)
    np.testing.assert_allclose(out, ref_out, **TOL)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, err_msg=f"d{name}", **TOL)
    # the mask matters in this case: without it the output differs
    unmasked = dot_product_attention(q, k, v, jnp.ones_like(seg), jnp.arange(t), jnp.ones_like(seg),
                                     False, jnp.float32)
    assert float(jnp.max(jnp.abs(unmasked - ref_out))) > 1e-2


def test_attention_block_rule():
    assert attention_block(512) == 64 and attention_block(40) == 40
    assert attention_block(4096) == 256 and 4096 // attention_block(4096) == 16
    assert attention_block(512, configured=128) == 128 and attention_block(100, configured=128) == 100
