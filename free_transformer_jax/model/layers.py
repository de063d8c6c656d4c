"""Llama-style building blocks: RMSNorm, RoPE, grouped-query attention with separate query and
key/value inputs (causal or not, packed-segment aware, optional fixed-shape KV cache), SwiGLU MLP,
the pre-norm block, and scanned/unrolled stacks of blocks.

Every parameter carries logical axis names (see ``sharding.py`` for the one table that maps them to
mesh axes). Parameters are stored in ``param_dtype`` and cast to the compute ``dtype`` at use;
normalisation statistics, attention logits and softmax are computed in float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from free_transformer_jax.model.config import KERNEL_IMPLS, ModelConfig, attention_block
from free_transformer_jax.model.fused import blocked_attention, swiglu
from free_transformer_jax.model.kernels import kernel_attention
from free_transformer_jax.model.masking import NEG_INF, attention_mask

Array = jax.Array


def logical_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
                  init: Callable, dtype) -> Array:
    """Creates a parameter annotated with logical axis names (one name per dimension)."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, axes)


@flax.struct.dataclass
class AttnContext:
    """What every attention layer of one forward pass shares.

    positions: (B, T) RoPE positions of the new tokens (per document when packed).
    segment_ids: (B, T) document id of each new token; 0 marks padding.
    kv_segment_ids: (B, S) document id of every key slot (S = T without a cache, the cache length
      with one). Attention never crosses a segment boundary.
    cache_index: None without a cache; else the scalar slot where the new tokens are written, which
      is also the absolute index of the first query for the causal mask.
    impl: which attention computes this pass (static): xla, chunked, or a kernel of
      ``kernels.py`` (only without a cache); see ``kernels.trace_impl``.
    """

    positions: Array
    segment_ids: Array
    kv_segment_ids: Array
    cache_index: Array | None = None
    impl: str = flax.struct.field(pytree_node=False, default="xla")


def dot_product_attention(q_BTKGD: Array, k_BSKD: Array, v_BSKD: Array, q_seg_BT: Array,
                          q_idx_T: Array, kv_seg_BS: Array, causal: bool, dtype) -> Array:
    """Softmax attention with the segment/causal mask; logits and softmax in float32."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32)
    scores = scores * (q_BTKGD.shape[-1] ** -0.5)
    scores = jnp.where(attention_mask(q_seg_BT, q_idx_T, kv_seg_BS, causal), scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKD)


def chunked_attention(q_BTKGD: Array, k_BSKD: Array, v_BSKD: Array, q_seg_BT: Array, q_idx_T: Array,
                      kv_seg_BS: Array, causal: bool, dtype, chunk: int) -> Array:
    """The same attention computed ``chunk`` queries at a time, each chunk rematerialised in the
    backward pass: the T x S score matrix never exists whole (peak chunk x S per head). When
    ``chunk`` does not divide T, the last T mod chunk queries are one more, shorter chunk."""
    b, t = q_BTKGD.shape[:2]
    n, full = t // chunk, (t // chunk) * chunk

    @jax.checkpoint
    def one(xs):
        q, q_seg, q_idx = xs
        return dot_product_attention(q, k_BSKD, v_BSKD, q_seg, q_idx, kv_seg_BS, causal, dtype)

    parts = []
    if n:
        split = lambda a, axis: jnp.moveaxis(  # noqa: E731
            a.reshape(a.shape[:axis] + (n, chunk) + a.shape[axis + 1:]), axis, 0)
        out = jax.lax.map(one, (split(q_BTKGD[:, :full], 1), split(q_seg_BT[:, :full], 1),
                                split(q_idx_T[:full], 0)))
        parts.append(jnp.moveaxis(out, 0, 1).reshape((b, full) + out.shape[3:]))
    if full < t:
        parts.append(one((q_BTKGD[:, full:], q_seg_BT[:, full:], q_idx_T[full:])))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = logical_param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones,
                              self.cfg.weight_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (y.astype(self.cfg.compute_dtype) * scale.astype(self.cfg.compute_dtype))


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies (head_dim / 2,), float32, with optional Llama-3.1 frequency scaling."""
    dim = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    if cfg.rope_scaling_factor:
        factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_len
        wavelen = 2 * np.pi / inv_freq
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        blend = (old_len / wavelen - low) / (high - low)
        blended = (1 - blend) * scaled / factor + blend * scaled
        middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(middle, blended, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x_BTND: Array, positions_BT: Array, inv_freq: np.ndarray) -> Array:
    """Rotary embedding, half-split convention (as HF Llama's rotate_half), computed in float32."""
    angles = positions_BT.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BTND.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTND.dtype)


class Attention(nn.Module):
    """Grouped-query attention. Queries come from ``xq``, keys/values from ``xkv`` (same length)."""

    cfg: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, xq_BTD: Array, xkv_BTD: Array, ctx: AttnContext,
                 cache: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array] | None]:
        cfg = self.cfg
        d, h, kvh, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        dt = cfg.compute_dtype
        init = nn.initializers.normal(cfg.init_std)

        def proj(name, x, n_heads, head_axis):
            w = logical_param(self, name, (d, n_heads, hd), ("embed", head_axis, "head_dim"), init,
                              cfg.weight_dtype)
            return jnp.einsum("btd,dnk->btnk", x, w.astype(dt))

        q = proj("q", xq_BTD, h, "heads")
        k = proj("k", xkv_BTD, kvh, "kv_heads")
        v = proj("v", xkv_BTD, kvh, "kv_heads")
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        k = constrain(k, ("act_batch", "act_seq", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))
        inv_freq = rope_inv_freq(cfg)
        q = apply_rope(q, ctx.positions, inv_freq)
        k = apply_rope(k, ctx.positions, inv_freq)

        new_cache = None
        if cache is not None:
            idx = ctx.cache_index
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, idx, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, idx, 0, 0))
            new_cache = {"k": k, "v": v}
            k, v = k.astype(dt), v.astype(dt)

        b, t = q.shape[:2]
        q = q.reshape(b, t, kvh, h // kvh, hd)
        offset = 0 if ctx.cache_index is None else ctx.cache_index
        q_idx = offset + jnp.arange(t)
        chunk = cfg.attention_chunk
        if ctx.impl in KERNEL_IMPLS:
            if cache is not None:
                raise ValueError(f"attention kernel {ctx.impl!r} cannot read a KV cache")
            out = kernel_attention(ctx.impl, q, k, v, ctx.segment_ids, self.causal, cfg)
        elif ctx.impl == "blocked" and cache is None:
            out = blocked_attention(q, k, v, ctx.segment_ids, self.causal,
                                    attention_block(t, cfg.attention_block_q))
        elif ctx.impl == "chunked" and t > chunk:  # t <= chunk: one chunk, the plain formula
            out = chunked_attention(q, k, v, ctx.segment_ids, q_idx, ctx.kv_segment_ids, self.causal,
                                    dt, chunk)
        else:
            out = dot_product_attention(q, k, v, ctx.segment_ids, q_idx, ctx.kv_segment_ids,
                                        self.causal, dt)
        out = out.reshape(b, t, h, hd)
        wo = logical_param(self, "o", (h, hd, d), ("heads", "head_dim", "embed"), init, cfg.weight_dtype)
        y = jnp.einsum("btnk,nkd->btd", out, wo.astype(dt))
        return y, new_cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        cfg = self.cfg
        d, f, dt = cfg.d_model, cfg.resolved_ffn_dim, cfg.compute_dtype
        init = nn.initializers.normal(cfg.init_std)
        w_gate = logical_param(self, "gate", (d, f), ("embed", "mlp"), init, cfg.weight_dtype)
        w_up = logical_param(self, "up", (d, f), ("embed", "mlp"), init, cfg.weight_dtype)
        w_down = logical_param(self, "down", (f, d), ("mlp", "embed"), init, cfg.weight_dtype)
        # forward as down(silu(x @ gate) * (x @ up)), backward written out (model/fused.py)
        return swiglu(x_BTD.astype(dt), w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt))


class Block(nn.Module):
    """Pre-norm Transformer block. With ``kv_input`` the attention takes its keys/values from
    ``norm(kv_input)`` (same norm parameters as the queries) while queries and the residual stream
    stay on ``x``: this is both the Free Transformer's injection block and its encoder block."""

    cfg: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, x_BTD: Array, cache: dict[str, Array] | None, ctx: AttnContext,
                 kv_input: Array | None = None) -> tuple[Array, dict[str, Array] | None]:
        norm = RMSNorm(self.cfg, name="attn_norm")
        hq = norm(x_BTD)
        hkv = hq if kv_input is None else norm(kv_input)
        attn_out, new_cache = Attention(self.cfg, self.causal, name="attn")(hq, hkv, ctx, cache)
        x = x_BTD + attn_out
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        return x, new_cache


_REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(block_cls: type[nn.Module], cfg: ModelConfig, in_scan: bool = False
                ) -> type[nn.Module]:
    """Wraps a block class in ``nn.remat`` following ``cfg.remat_policy``. CSE prevention can only
    be dropped inside a scan (whose loop already keeps XLA from merging the recomputation with
    the forward pass); a block outside one would silently lose its remat."""
    if cfg.remat_policy == "none":
        return block_cls
    return nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not in_scan)


class Stack(nn.Module):
    """``n`` causal blocks, as one ``nn.scan`` (params stacked on a leading ``layers`` axis, under
    ``layers``) or unrolled (``layers_0`` ... ``layers_{n-1}``). The KV cache, when given, has a
    leading layer axis in both layouts."""

    cfg: ModelConfig
    n: int

    @nn.compact
    def __call__(self, x_BTD: Array, cache: dict[str, Array] | None,
                 ctx: AttnContext) -> tuple[Array, dict[str, Array] | None]:
        if self.n == 0:
            return x_BTD, cache
        block_cls = maybe_remat(Block, self.cfg, in_scan=self.cfg.scan_layers)
        if self.cfg.scan_layers:
            scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(0, nn.broadcast), length=self.n,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            return scanned(self.cfg, name="layers")(x_BTD, cache, ctx)
        new_caches = []
        for i in range(self.n):
            layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
            x_BTD, c = block_cls(self.cfg, name=f"layers_{i}")(x_BTD, layer_cache, ctx)
            new_caches.append(c)
        if cache is None:
            return x_BTD, None
        return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *new_caches)
