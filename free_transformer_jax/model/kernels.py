"""Fused attention kernels behind one call: the TPU Splash kernel, cuDNN flash attention and the
Pallas/Triton GPU flash kernel.

Every kernel computes the same attention as ``layers.dot_product_attention`` without a KV cache:
queries and keys of one length, a key visible when it is in the query's segment (segment ids, 0 =
padding) and, when causal, at or before it; grouped-query heads (query head ``k * G + g`` reads
key/value head ``k``); scale ``head_dim ** -0.5``. Under a mesh each kernel runs inside
``shard_map`` (rows over the batch axes, heads over ``tensor``), since GSPMD cannot split a custom
kernel and would gather its inputs whole. See BUILD_NOTES "Attention kernels and benchmarks".
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model.config import (ConfigError, ModelConfig, attention_impl_problem,
                                               cached_attention_impl, kernel_blocks,
                                               resolve_attention_impl)

Array = jax.Array
_LOGGED: set[str] = set()


def context_platform() -> str:
    """The platform the current trace compiles for: the mesh's devices when a mesh is set (so an
    AOT compile for a TPU topology on a CPU host says tpu), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def trace_impl(cfg: ModelConfig, seq_len: int, cached: bool) -> str:
    """The attention a call traced now uses: ``cfg.attention_impl`` checked against the platform
    and length (a ConfigError when it cannot run), ``auto`` resolved (logged once). Calls with a
    KV cache use the xla path, chunked when ``attention_chunk`` is set and the choice is not xla."""
    if cached:
        return cached_attention_impl(cfg)
    resolved, line = resolve_attention_impl(cfg, context_platform(), seq_len=seq_len, packed=None)
    if cfg.attention_impl == "auto" and line not in _LOGGED:
        _LOGGED.add(line)
        logging.info("%s", line)
    return resolved.attention_impl


def kernel_length(cfg: ModelConfig, n: int) -> int:
    """The shortest length >= ``n`` that ``cfg.attention_impl`` takes in a call without a cache:
    ``n`` itself unless the choice is a fused kernel with length rules (Splash: multiples of 128
    and of its blocks; the Pallas GPU kernel: of its blocks). For callers free to pad their rows
    with segment id 0 (choice scoring), so an explicit kernel runs at any row length."""
    impl = cfg.attention_impl
    if impl not in _KERNELS:
        return n
    platform = context_platform()
    for length in range(n, n + 8192):
        if attention_impl_problem(cfg, impl, platform, length, None) is None:
            return length
    raise ConfigError(f"model.attention_impl={impl!r} "
                      f"{attention_impl_problem(cfg, impl, platform, n, None)}")


def _mesh_axes(names: tuple[str | None, ...]):
    return nn.logical_to_mesh_axes(names)


def _sharded(fn, q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, seg_BT: Array) -> Array:
    """Runs ``fn`` on each device's rows and heads when a mesh is set; directly otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q_BTHD, k_BSKD, v_BSKD, seg_BT)
    q_spec = _mesh_axes(("act_batch", None, "act_heads", None))
    kv_spec = _mesh_axes(("act_batch", None, "act_kv_heads", None))
    seg_spec = _mesh_axes(("act_batch", None))
    size = shard_lib.axis_size(mesh, kv_spec[2])
    if k_BSKD.shape[2] % size:
        raise ConfigError(f"mesh tensor={size} does not divide model.n_kv_heads="
                          f"{k_BSKD.shape[2]}: a fused attention kernel keeps each kv head's "
                          "queries on one device; lower mesh.tensor or use attention_impl=xla")
    return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q_BTHD, k_BSKD, v_BSKD, seg_BT)


def _splash_kernel(seq_len: int, heads: int, kv_heads: int, causal: bool, block_q: int,
                   block_kv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask_cls = splash.CausalMask if causal else splash.FullMask
    mask = splash.MultiHeadMask([mask_cls((seq_len, seq_len)) for _ in range(heads)])
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv,
                               block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                               block_kv_dq=block_kv)
    make = splash.make_splash_mqa if kv_heads == 1 else splash.make_splash_mha
    return make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, seg_BT: Array, causal: bool,
                     cfg: ModelConfig) -> Array:
    """TPU Splash attention (per row, vmapped over the batch). One kv head uses the MQA kernel,
    several the MHA kernel, which reads query heads in groups of ``heads // kv_heads``."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, h, d = q_BTHD.shape
    kvh = k_BSKD.shape[2]
    block_q, block_kv = kernel_blocks(cfg, "splash", t)
    kernel = _splash_kernel(t, h, kvh, causal, block_q, block_kv, cfg.attention_interpret)
    # scaled in float32 (a bf16 constant 128**-0.5 would bias every logit by up to 0.2%)
    q = jnp.swapaxes((q_BTHD.astype(jnp.float32) * d**-0.5).astype(q_BTHD.dtype), 1, 2)  # B H T D
    k, v = jnp.swapaxes(k_BSKD, 1, 2), jnp.swapaxes(v_BSKD, 1, 2)  # B K S D
    if kvh == 1:
        k, v = k[:, 0], v[:, 0]
    seg = seg_BT.astype(jnp.int32)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, splash.SegmentIds(s1, s1)))(q, k, v, seg)
    return jnp.swapaxes(out, 1, 2).astype(q_BTHD.dtype)


def pallas_gpu_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, seg_BT: Array, causal: bool,
                         cfg: ModelConfig) -> Array:
    """The Pallas/Triton flash attention (forward and fused backward kernels) with segment ids.
    The kernel wants as many kv heads as query heads: each kv head is repeated for its group."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, t, h, d = q_BTHD.shape
    group = h // k_BSKD.shape[2]
    block_q, block_k = kernel_blocks(cfg, "pallas_gpu", t)
    bwd = min(32, t)  # the kernel's own default backward tile
    blocks = gpu_attention.BlockSizes(block_q=block_q, block_k=block_k, block_q_dkv=bwd,
                                      block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd)
    k = jnp.repeat(k_BSKD, group, axis=2) if group > 1 else k_BSKD
    v = jnp.repeat(v_BSKD, group, axis=2) if group > 1 else v_BSKD
    return gpu_attention.mha(q_BTHD, k, v, seg_BT.astype(jnp.int32), sm_scale=d**-0.5,
                             causal=causal, block_sizes=blocks,
                             interpret=cfg.attention_interpret)


def cudnn_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, seg_BT: Array, causal: bool,
                    cfg: ModelConfig, implementation: str = "cudnn") -> Array:
    """cuDNN flash attention through ``jax.nn.dot_product_attention``. cuDNN has no segment ids:
    a row is one document followed by padding, whose length (tokens with a nonzero segment id,
    at least 1) is passed as the query and key length. Outputs at padding positions are not
    those of the xla path (nothing reads them: later real tokens never attend to padding).
    ``implementation="xla"`` runs the same call through XLA (the CPU test of this wiring)."""
    del cfg
    lengths = jnp.maximum(jnp.sum(seg_BT != 0, axis=1), 1).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q_BTHD, k_BSKD, v_BSKD, scale=q_BTHD.shape[-1] ** -0.5, is_causal=causal,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)


_KERNELS = {"splash": splash_attention, "pallas_gpu": pallas_gpu_attention,
            "cudnn": cudnn_attention}


def kernel_attention(impl: str, q_BTKGD: Array, k_BSKD: Array, v_BSKD: Array, seg_BT: Array,
                     causal: bool, cfg: ModelConfig) -> Array:
    """Attention through kernel ``impl`` with the layout of ``layers.dot_product_attention``
    (queries grouped by kv head: B T K G D), sharded over the mesh when one is set."""
    b, t, kvh, g, d = q_BTKGD.shape
    problem = attention_impl_problem(cfg, impl, context_platform(), t, None)
    if problem:  # e.g. a call at another length than the configured one
        raise ConfigError(f"model.attention_impl={impl!r} {problem}")
    fn = functools.partial(_KERNELS[impl], causal=causal, cfg=cfg)
    out = _sharded(fn, q_BTKGD.reshape(b, t, kvh * g, d), k_BSKD, v_BSKD, seg_BT)
    return out.reshape(b, t, kvh, g, d)
