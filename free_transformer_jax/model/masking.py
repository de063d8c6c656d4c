"""The attention mask every attention path shares (``layers``, ``fused``): segment ids and
causality, and the finite value masked scores get."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30  # finite: a fully masked row (padding) gives a uniform softmax, never NaN


def attention_mask(q_seg_BT: Array, q_idx_T: Array, kv_seg_BS: Array, causal: bool) -> Array:
    """(B, 1, 1, T, S) boolean mask: same segment, and key slot <= query slot when causal."""
    mask = q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
    if causal:
        mask = mask & (jnp.arange(kv_seg_BS.shape[1])[None, :] <= q_idx_T[:, None])[None]
    return mask[:, None, None, :, :]
