"""The Free Transformer (BUILD_NOTES.md, "Model") and, with ``cfg.latent=False``, its Llama-style baseline.

Parameter tree (``[L]`` marks a leading stacked-layers axis when ``scan_layers``):
  embedding (V, D)
  lower/layers[L]    blocks 1 .. inject_layer            (causal)
  inject             block inject_layer + 1: keys/values from norm(x_mid + r)
  upper/layers[L]    blocks inject_layer + 2 .. n_layers (causal)
  final_norm, readout (D, V) unless tied
  encoder/{zeta, block, norm, bits (D, H)}  and  post_sampler (C, D)   (latent only)
With the latent off the last two are absent and block ``inject`` is an ordinary block, so the model
is exactly a Llama decoder whose layer ``inject_layer`` is stored under its own name.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from free_transformer_jax.model import latent as latent_lib
from free_transformer_jax.model.config import ModelConfig
from free_transformer_jax.model.kernels import trace_impl
from free_transformer_jax.model.layers import (AttnContext, Block, RMSNorm, Stack, constrain,
                                               logical_param, maybe_remat)

Array = jax.Array
LATENT_MODES = ("posterior", "prior")


def sinusoid(positions_BT: Array, dim: int, base: float = 10_000.0) -> Array:
    """Fixed sinusoidal position signal (B, T, dim): [sin(p f_i), cos(p f_i)], float32."""
    freqs = base ** (-jnp.arange(dim // 2, dtype=jnp.float32) / max(dim // 2, 1))
    angles = positions_BT.astype(jnp.float32)[..., None] * freqs
    out = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(out, ((0, 0), (0, 0), (0, dim - out.shape[-1])))


class Encoder(nn.Module):
    """One non-causal block whose queries (and residual stream) start at a learned ``zeta`` (plus,
    by default, a gated absolute position signal), with keys/values from the mid-stack activations
    and RoPE on both, then RMSNorm and a readout to H bit logits."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_mid_BTD: Array, ctx: AttnContext) -> Array:
        cfg = self.cfg
        zeta = logical_param(self, "zeta", (cfg.d_model,), ("embed",),
                             nn.initializers.normal(cfg.init_std), cfg.weight_dtype)
        q_BTD = jnp.broadcast_to(zeta, x_mid_BTD.shape)
        if cfg.encoder_abs_pos:
            # RoPE alone is blind to position whenever the values are all alike (a constant or
            # periodic input): attention then averages identical vectors. A fixed sinusoid with a
            # learned per-channel gain gives the query stream an absolute position (BUILD_NOTES).
            gain = logical_param(self, "pos_gain", (cfg.d_model,), ("embed",),
                                 nn.initializers.constant(cfg.init_std), cfg.weight_dtype)
            q_BTD = q_BTD + gain * sinusoid(ctx.positions, cfg.d_model)
        q_BTD = q_BTD.astype(cfg.compute_dtype)
        block = maybe_remat(Block, cfg)(cfg, causal=False, name="block")
        h, _ = block(q_BTD, None, ctx, kv_input=x_mid_BTD)
        h = RMSNorm(cfg, name="norm")(h)
        w = logical_param(self, "bits", (cfg.d_model, cfg.latent_bits), ("embed", "latent_bits"),
                          nn.initializers.normal(cfg.init_std), cfg.weight_dtype)
        return jnp.einsum("btd,dh->bth", h.astype(jnp.float32), w.astype(jnp.float32))


class FreeTransformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT: Array, *, latent: str | Array = "posterior",
                 segment_ids: Array | None = None, positions: Array | None = None,
                 cache: dict[str, Any] | None = None,
                 row_ids: Array | None = None) -> tuple[Array, dict[str, Any]]:
        """Runs the model on ``tokens_BT``.

        latent: ``"posterior"`` (run the encoder and sample Z from it: training, evaluation, prompt
          prefill), ``"prior"`` (Z uniform), or an int array (B, T) of codes (shared-Z experiments,
          generation). Ignored by the baseline. Z is drawn from the ``latent`` rng stream.
        segment_ids: (B, T) document ids for packed rows, 0 = padding (default: all ones).
        positions: (B, T) RoPE positions (default: 0..T-1, offset by the cache index).
        cache: from :func:`init_cache`; the new tokens are written at ``cache["index"]``.
        row_ids: (B,) global index of each row in its batch (default 0..B-1). Z's noise for a row
          depends only on the rng and its row id, so a batch split into micro-batches or over a
          mesh samples exactly the same Z.

        Returns ``(logits_BTV float32, aux)``; ``aux`` holds ``codes`` (B, T), and in posterior mode
        ``bit_logits`` (B, T, H) and ``kl`` (B, T, per-token KL in nats); ``cache`` when given one.
        """
        cfg = self.cfg
        b, t = tokens_BT.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        # init only creates parameters, which no attention choice changes (and its dummy input
        # need not suit a kernel): the xla path there
        impl = "xla" if self.is_initializing() else trace_impl(cfg, t, cached=cache is not None)
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            ctx = AttnContext(positions, segment_ids, segment_ids, None, impl)
        else:
            idx = cache["index"]
            if positions is None:
                positions = jnp.broadcast_to(idx + jnp.arange(t, dtype=jnp.int32), (b, t))
            kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                                  (0, idx))
            ctx = AttnContext(positions, segment_ids, kv_seg, idx, impl)
        layer_cache = (lambda name: None) if cache is None else (lambda name: cache[name])

        embedding = logical_param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                  nn.initializers.normal(cfg.init_std), cfg.weight_dtype)
        x = jnp.take(embedding.astype(cfg.compute_dtype), tokens_BT, axis=0)
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))

        n_lower = cfg.resolved_inject_layer
        x, lower_cache = Stack(cfg, n_lower, name="lower")(x, layer_cache("lower"), ctx)

        aux: dict[str, Any] = {}
        kv_input = None
        if cfg.latent:
            r_BTD, aux = self._latent(x, ctx, latent, row_ids)
            kv_input = x + r_BTD.astype(cfg.compute_dtype)
        inject = maybe_remat(Block, cfg)(cfg, causal=True, name="inject")
        x, inject_cache = inject(x, layer_cache("inject"), ctx, kv_input=kv_input)
        x, upper_cache = Stack(cfg, cfg.n_layers - n_lower - 1, name="upper")(
            x, layer_cache("upper"), ctx)

        x = RMSNorm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:
            readout = embedding.T
        else:
            readout = logical_param(self, "readout", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                    nn.initializers.normal(cfg.init_std), cfg.weight_dtype)
        logits = jnp.einsum("btd,dv->btv", x, readout.astype(cfg.compute_dtype),
                            preferred_element_type=jnp.float32)
        logits = constrain(logits, ("act_batch", "act_seq", "act_vocab"))
        if cache is not None:
            aux["cache"] = {"lower": lower_cache, "inject": inject_cache, "upper": upper_cache,
                            "segment_ids": ctx.kv_segment_ids, "index": cache["index"] + t}
        return logits, aux

    def _latent(self, x_mid_BTD: Array, ctx: AttnContext, latent: str | Array, row_ids: Array | None):
        """Z for every position and its contribution r = Z @ W to the injection block's keys/values."""
        cfg = self.cfg
        table = logical_param(self, "post_sampler", (cfg.num_codes, cfg.d_model),
                              ("latent_codes", "embed"), nn.initializers.normal(cfg.init_std),
                              cfg.weight_dtype)
        shape = x_mid_BTD.shape[:2]
        if isinstance(latent, str):
            if latent not in LATENT_MODES:
                raise ValueError(f"latent={latent!r}: expected one of {LATENT_MODES} or an int array "
                                 "of codes")
            if latent == "prior":
                codes = latent_lib.prior_codes(self.make_rng("latent"), shape, cfg.latent_bits, row_ids)
                return jnp.take(table, codes, axis=0), {"codes": codes}
            # the encoder sees only this call's tokens (e.g. the prompt at prefill), never a cache
            enc_ctx = AttnContext(ctx.positions, ctx.segment_ids, ctx.segment_ids, None, ctx.impl)
            bit_logits = Encoder(cfg, name="encoder")(x_mid_BTD, enc_ctx)
            codes = latent_lib.sample_codes(self.make_rng("latent"), bit_logits, row_ids)
            if cfg.latent_impl == "fused":
                r = latent_lib.fused_post_sampler(bit_logits, table, codes, cfg.latent_token_chunk,
                                                  cfg.latent_code_chunk)
            else:
                r = latent_lib.dense_post_sampler(bit_logits, table, codes)
            aux = {"codes": codes, "bit_logits": bit_logits, "kl": latent_lib.kl_per_token(bit_logits)}
            return r, aux
        codes = jnp.asarray(latent).astype(jnp.int32)
        if codes.shape != shape:
            raise ValueError(f"latent codes have shape {codes.shape}; expected (batch, seq) = {shape}")
        return jnp.take(table, codes, axis=0), {"codes": codes}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
    """A zero KV cache for ``max_len`` positions (leading layer axis for each stack)."""
    dtype = dtype or cfg.compute_dtype
    shape = (batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    n_lower = cfg.resolved_inject_layer

    def stack(n):
        if n == 0:
            return None
        return {"k": jnp.zeros((n,) + shape, dtype), "v": jnp.zeros((n,) + shape, dtype)}

    return {"lower": stack(n_lower), "inject": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
            "upper": stack(cfg.n_layers - n_lower - 1),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def init_params(cfg: ModelConfig, key: Array, seq_len: int = 8) -> dict[str, Any]:
    """Initialised (boxed, logically annotated) parameters; see ``train/state.py`` for sharded init."""
    model = FreeTransformer(cfg)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    k_params, k_latent = jax.random.split(key)
    return model.init({"params": k_params, "latent": k_latent}, tokens)["params"]


def stack_unrolled(params: dict[str, Any]) -> dict[str, Any]:
    """Converts an unrolled tree (``layers_0..``) into the scanned layout (``layers`` stacked)."""
    out = dict(params)
    for name in ("lower", "upper"):
        if name in params:
            sub = params[name]
            keys = sorted(sub, key=lambda k: int(k.split("_")[1]))
            out[name] = {"layers": jax.tree.map(lambda *a: jnp.stack(a), *[sub[k] for k in keys])}
    return out


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`stack_unrolled`."""
    out = dict(params)
    for name in ("lower", "upper"):
        if name in params:
            stacked = params[name]["layers"]
            n = jax.tree.leaves(stacked)[0].shape[0]
            out[name] = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)}
    return out
