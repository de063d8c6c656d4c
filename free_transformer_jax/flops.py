"""Parameter counts (from ``jax.eval_shape``, nothing allocated) and analytic FLOPs (BUILD_NOTES.md,
"FLOPs and MFU")."""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from free_transformer_jax.model.config import ModelConfig
from free_transformer_jax.model.transformer import init_params


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part: total, decoder (shared with the baseline), encoder (the extra
    block + zeta + bit readout), post_sampler (the 2**H x D table), embedding/readout."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda k: init_params(cfg, k, seq_len=2),
                                          jax.random.key(0)))
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    enc = count(shapes.get("encoder", {}))
    table = count(shapes.get("post_sampler", {}))
    total = count(shapes)
    return {"total": total, "decoder": total - enc - table, "encoder": enc, "post_sampler": table,
            "embedding": count(shapes["embedding"]), "readout": count(shapes.get("readout", {}))}


def _block_matmul_flops(cfg: ModelConfig) -> int:
    """Forward matmul FLOPs per token of one block's projections (2 FLOPs per multiply-add)."""
    d, h, kvh, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.resolved_ffn_dim
    return 2 * d * hd * (2 * h + 2 * kvh) + 2 * 3 * d * f


def _attention_flops(cfg: ModelConfig, keys_per_query: float) -> float:
    """Forward FLOPs per token of QK^T and PV for one block."""
    return 2 * 2 * cfg.n_heads * cfg.resolved_head_dim * keys_per_query


def train_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Analytic training FLOPs per token (forward + backward = 3x forward for every matmul).

    Attention is counted causally by default: a query attends to (T + 1) / 2 keys on average in
    the decoder (``causal=False`` counts the full T x T square, which is what a dense-masked XLA
    kernel executes); the encoder block is non-causal and always counts T keys. The latent path
    has no forward matmul (a gather); its backward is ``c = g @ W^T`` (2 C D), ``l @ U^T`` and
    ``(c*G) @ U`` (2 C H each). Norms, softmax and other elementwise work are not counted.
    """
    avg_keys = (seq_len + 1) / 2 if causal else seq_len
    per_block = _block_matmul_flops(cfg) + _attention_flops(cfg, avg_keys)
    decoder = 3 * (cfg.n_layers * per_block + 2 * cfg.d_model * cfg.vocab_size)
    out = {"decoder": decoder, "encoder": 0.0, "latent": 0.0}
    if cfg.latent:
        enc = _block_matmul_flops(cfg) + _attention_flops(cfg, seq_len) + 2 * cfg.d_model * cfg.latent_bits
        out["encoder"] = 3 * enc
        c, h = cfg.num_codes, cfg.latent_bits
        out["latent"] = 2 * c * cfg.d_model + 2 * 2 * c * h
    out["total"] = out["decoder"] + out["encoder"] + out["latent"]
    return out


# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity). Matched against
# ``device.device_kind`` by substring, first match wins (so "v5 lite" precedes "v5").
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)
_measured_cpu_peak: float | None = None


def measure_cpu_peak(n: int = 1024, repeats: int = 10, clock=None) -> float:
    """A CPU 'peak' measured once per process: float32 FLOP/s of an n x n matmul, the fastest of
    ``repeats`` timed calls (a mean lets a moment of contention from other processes set the peak
    low, and MFU then reads above 100%). ``clock``: seconds, default ``time.perf_counter``."""
    global _measured_cpu_peak
    if _measured_cpu_peak is None:
        import time

        import jax.numpy as jnp

        clock = clock or time.perf_counter
        x = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a: a @ a)
        f(x).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = clock()
            f(x).block_until_ready()
            best = min(best, clock() - t0)
        _measured_cpu_peak = 2 * n**3 / best
    return _measured_cpu_peak


def peak_flops_per_device(device: jax.Device | None = None) -> float:
    device = device or jax.devices()[0]
    kind = device.device_kind
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peak
    if device.platform == "cpu":
        # simulated devices share the host's cores
        return measure_cpu_peak() / max(len(jax.local_devices()), 1)
    return float("nan")


def mfu(tokens_per_second: float, flops_per_token: float, n_devices: int,
        peak_per_device: float) -> float:
    return tokens_per_second * flops_per_token / (n_devices * peak_per_device)
