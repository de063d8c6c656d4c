"""Model configuration: one frozen dataclass, validated at construction.

Config files (``configs/*.py``) hold an ``ml_collections.ConfigDict`` whose ``model`` section is turned
into a :class:`ModelConfig` with :func:`ModelConfig.from_dict`; every check that can be made without
a mesh happens here so a bad value fails before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
LATENT_IMPLS = ("fused", "dense")
FREE_BITS_SCOPES = ("token", "batch")
AGGREGATE_KL_FORMS = ("codes", "bits")
AGGREGATE_KL_MAX_BITS = 12  # the "codes" form holds a (B, T, 2**H) float32 tensor
# xla: one dense einsum, autodiffed (the reference); chunked: the same, `attention_chunk` queries
# at a time; blocked: pure JAX, blocks of queries against the keys they see, with a written-out
# flash-style backward (model/fused.py; any platform, the CPU default); splash: the TPU Splash
# kernel; cudnn: cuDNN flash attention (GPU); pallas_gpu: the Pallas/Triton flash kernel (GPU);
# auto: the best of these for the platform (see resolve_attention_impl).
ATTENTION_IMPLS = ("xla", "chunked", "blocked", "splash", "cudnn", "pallas_gpu", "auto")
KERNEL_IMPLS = ("splash", "cudnn", "pallas_gpu")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Free Transformer (or, with ``latent=False``, its Llama baseline)."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    ffn_dim: int = 0  # 0: a Llama-like 8/3 * d_model rounded up to a multiple of 256
    rope_theta: float = 10_000.0
    # Llama-3.1 style RoPE frequency scaling (0 = off); read from HF configs by convert.py.
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # The latent path (model/latent.py; BUILD_NOTES.md, "Model").
    latent: bool = True
    latent_bits: int = 16  # H; C = 2**H codes
    kappa_bits: float = 0.5  # free bits per token, in bits (kappa in nats = kappa_bits * ln 2)
    kl_weight: float = 1.0
    # "token": the paper's mean_t max(0, KL_t - kappa), per token of each sequence. "batch" (not in
    # the paper; an ablation knob): the hinge on each position's batch-mean KL (latent.batch_free_bits_kl).
    free_bits_scope: str = "token"
    # Not in the paper (default off): + weight * KL(batch-averaged posterior || uniform) per
    # position, so prior samples look like the posterior's (latent.aggregate_kl).
    aggregate_kl_weight: float = 0.0
    # > 0: that weight rises linearly from 0 at step 0 to aggregate_kl_weight at this step (weight
    # 1 from step 0 collapses the posterior before the decoder learns to read Z; BUILD_NOTES)
    aggregate_kl_ramp_steps: int = 0
    aggregate_kl_form: str = "codes"  # "codes": exact, H <= 12; "bits": per-bit marginals, any H
    inject_layer: int = -1  # -1: n_layers // 2. The encoder reads the stream after this many blocks.
    latent_impl: str = "fused"
    encoder_abs_pos: bool = True  # add a gated sinusoid to the encoder's zeta queries (see BUILD_NOTES)
    # fused backward: positions per chunk (-1: latent.auto_token_chunk's measured rule, about
    # LATENT_CHUNK_BYTES of float32 per tokens x codes tensor; 0 = the whole sequence)
    latent_token_chunk: int = -1
    latent_code_chunk: int = 0  # fused backward: codes per chunk (0 = all codes at once)
    # Numerics and memory.
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    # Which attention computes every block without a KV cache (decoder, injection, encoder); one
    # of ATTENTION_IMPLS. Calls with a KV cache (prefill and decoding) use the xla path (chunked
    # when that is the choice). See BUILD_NOTES "Attention kernels and benchmarks".
    attention_impl: str = "auto"
    # chunked (and auto on CPU): attention computed this many queries at a time (each chunk
    # rematerialised), so the T x T scores never exist whole; 0 = one dense einsum. Used when it
    # divides the sequence length.
    attention_chunk: int = 0
    # splash / pallas_gpu tile sizes along queries and keys (0: the kernel's default, 512 for
    # splash and 128 for pallas_gpu, capped at the sequence length); blocked: queries per block
    # (attention_block_q; 0: fused.attention_block's measured rule).
    attention_block_q: int = 0
    attention_block_kv: int = 0
    # Run the Pallas kernels (splash, pallas_gpu) in interpret mode: numerics on a CPU, slowly.
    attention_interpret: bool = False

    def __post_init__(self):
        def fail(field: str, msg: str):
            raise ConfigError(f"model.{field}={getattr(self, field)!r}: {msg}")

        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(self, field) < 1:
                fail(field, "must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"must divide n_heads={self.n_heads} (grouped-query attention)")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            fail("head_dim", f"is 0 (derive) but d_model={self.d_model} is not divisible by "
                 f"n_heads={self.n_heads}; set head_dim explicitly")
        if self.resolved_head_dim % 2:
            fail("head_dim", "must be even for rotary embeddings")
        if self.head_dim < 0 or self.ffn_dim < 0:
            fail("head_dim" if self.head_dim < 0 else "ffn_dim", "must be >= 0 (0 derives it)")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be > 0")
        if self.norm_eps <= 0:
            fail("norm_eps", "must be > 0")
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {sorted(DTYPES)}")
        if self.param_dtype not in DTYPES:
            fail("param_dtype", f"must be one of {sorted(DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", f"must be one of {REMAT_POLICIES}")
        if self.latent_impl not in LATENT_IMPLS:
            fail("latent_impl", f"must be one of {LATENT_IMPLS}")
        if not 1 <= self.latent_bits <= 20:
            fail("latent_bits", "must be in [1, 20] (C = 2**H codes; the paper uses 16)")
        if self.kappa_bits < 0:
            fail("kappa_bits", "must be >= 0 (free bits per token, in bits)")
        if self.kl_weight < 0:
            fail("kl_weight", "must be >= 0")
        if self.free_bits_scope not in FREE_BITS_SCOPES:
            fail("free_bits_scope", "must be 'token' (the paper's per-token hinge) or 'batch' (the "
                 "hinge on each position's batch-mean KL)")
        if self.aggregate_kl_weight < 0:
            fail("aggregate_kl_weight", "must be >= 0 (0 = off, the paper's loss)")
        if self.aggregate_kl_ramp_steps < 0:
            fail("aggregate_kl_ramp_steps", "must be >= 0 (0 = the full weight from step 0)")
        if self.aggregate_kl_form not in AGGREGATE_KL_FORMS:
            fail("aggregate_kl_form", f"must be 'codes' (exact, H <= {AGGREGATE_KL_MAX_BITS}) or "
                 "'bits' (any H)")
        if (self.aggregate_kl_weight and self.aggregate_kl_form == "codes"
                and self.latent_bits > AGGREGATE_KL_MAX_BITS):
            fail("aggregate_kl_form", f"'codes' needs latent_bits <= {AGGREGATE_KL_MAX_BITS}, not "
                 f"{self.latent_bits}; use 'bits' (per-bit marginals)")
        if not -1 <= self.inject_layer < self.n_layers or (self.n_layers == 1 and self.inject_layer != 0):
            fail("inject_layer", f"must be in [0, n_layers-1] = [0, {self.n_layers - 1}] "
                 "(or -1 for n_layers // 2): at least one block must follow the encoder")
        if self.attention_chunk < 0:
            fail("attention_chunk", "must be >= 0 (0 = no chunking)")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"must be one of {ATTENTION_IMPLS}")
        if self.attention_impl == "chunked" and self.attention_chunk == 0:
            fail("attention_impl", "'chunked' needs model.attention_chunk > 0 (queries per chunk)")
        for field in ("attention_block_q", "attention_block_kv"):
            size = getattr(self, field)
            if size < 0:
                fail(field, "must be 0 (the kernel's default) or a positive block size (Splash: "
                     "a multiple of 128; the Pallas GPU kernel: a power of two)")
        if self.attention_impl == "cudnn" and (problem := cudnn_config_problem(self)):
            fail("attention_impl", f"'cudnn' {problem}; use 'pallas_gpu' or 'xla'")
        if self.latent_token_chunk < -1:
            fail("latent_token_chunk", "must be -1 (the measured rule), 0 (no chunking) or a "
                 "positive number of positions")
        if self.latent_code_chunk < 0:
            fail("latent_code_chunk", "must be >= 0 (0 = no chunking)")
        if self.latent_code_chunk and (2**self.latent_bits) % self.latent_code_chunk:
            fail("latent_code_chunk", f"must divide the number of codes 2**{self.latent_bits}")

    # Derived values -------------------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_ffn_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        return 256 * math.ceil(8 * self.d_model / 3 / 256)

    @property
    def resolved_inject_layer(self) -> int:
        return self.n_layers // 2 if self.inject_layer == -1 else self.inject_layer

    @property
    def num_codes(self) -> int:
        return 2**self.latent_bits

    @property
    def kappa_nats(self) -> float:
        return self.kappa_bits * math.log(2.0)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    # Conversions ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a mapping (e.g. ``config.model``); an unknown key is an error."""
        d = dict(d.items()) if hasattr(d, "items") else dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _platform_name(platform: str) -> str:
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def kernel_blocks(cfg: ModelConfig, impl: str, seq_len: int) -> tuple[int, int]:
    """(query block, key block) a kernel uses at ``seq_len``: the config's or the kernel's default,
    capped at the sequence length."""
    default = 512 if impl == "splash" else 128
    return (min(cfg.attention_block_q or default, seq_len),
            min(cfg.attention_block_kv or default, seq_len))


def attention_block(seq_len: int, configured: int = 0) -> int:
    """Queries per block: ``configured`` when set, else the measured rule: 64 (the fastest here for
    the bench shape's T = 512, within 5% of 128), growing with the length so that a row is cut
    into at most 16 blocks (each block is its own set of operations in the program)."""
    if configured:
        return min(configured, seq_len)
    return min(seq_len, max(64, 64 * math.ceil(seq_len / 16 / 64)))


def cached_attention_impl(cfg: ModelConfig) -> str:
    """The attention of calls with a KV cache (prefill, decoding), which no kernel here expresses
    (queries start at the cache index): chunked when ``attention_chunk`` is set and the choice is
    not xla, else xla."""
    return "chunked" if cfg.attention_chunk and cfg.attention_impl != "xla" else "xla"


def cudnn_config_problem(cfg: ModelConfig) -> str | None:
    """What in the model config alone keeps cuDNN flash attention out (None: nothing); the one
    place these limits live (config validation and attention_impl_problem, which auto uses, ask
    here)."""
    if cfg.dtype not in ("bfloat16", "float16"):
        return f"needs model.dtype bfloat16 or float16, not {cfg.dtype} (cuDNN flash attention)"
    if cfg.resolved_head_dim % 8 or cfg.resolved_head_dim > 256:
        return f"needs a head_dim that is a multiple of 8 and <= 256, not {cfg.resolved_head_dim}"
    return None


def attention_impl_problem(cfg: ModelConfig, impl: str, platform: str, seq_len: int,
                           packed: bool | None) -> str | None:
    """Why kernel ``impl`` cannot run this case (None when it can); ``packed=None``: unknown."""
    platform = _platform_name(platform)
    if impl in ("xla", "chunked", "blocked"):
        return None
    home = "tpu" if impl == "splash" else "gpu"
    if platform != home and not (cfg.attention_interpret and impl != "cudnn"):
        hint = "; model.attention_interpret=True runs it on a CPU, slowly" if impl != "cudnn" else ""
        return f"runs on {home.upper()} only, not {platform}{hint}"
    if impl == "cudnn":
        if problem := cudnn_config_problem(cfg):
            return problem
        if packed:
            return ("cannot express packed rows (segment ids; data.packing != 'none'): use "
                    "'pallas_gpu' or set data.packing=none")
        return None
    bq, bkv = kernel_blocks(cfg, impl, seq_len)
    if impl == "splash" and seq_len % 128:
        return f"needs a sequence length that is a multiple of 128, not {seq_len}"
    if impl == "splash" and (bq % 128 or bkv % 128):
        return (f"needs blocks that are multiples of 128 (model.attention_block_q={bq}, "
                f"attention_block_kv={bkv})")
    if seq_len % bq or seq_len % bkv:
        return (f"needs the sequence length {seq_len} to be a multiple of its blocks "
                f"(model.attention_block_q={bq}, attention_block_kv={bkv})")
    if impl == "pallas_gpu" and (bq & (bq - 1) or bkv & (bkv - 1) or seq_len % min(32, seq_len)):
        return f"needs power-of-two blocks dividing the sequence length {seq_len}"
    return None


def resolve_attention_impl(cfg: ModelConfig, platform: str, *, seq_len: int,
                           packed: bool | None) -> tuple[ModelConfig, str]:
    """The concrete attention for a run on ``platform`` (a device's ``.platform``: cpu, gpu, tpu)
    with rows of ``seq_len`` tokens, ``packed`` when they hold several documents (None: unknown).

    ``auto`` picks Splash on TPU, cuDNN on GPU for unpacked bfloat16/float16 rows and the Pallas
    kernel for packed ones, and on a CPU ``chunked`` when ``attention_chunk`` is set, else
    ``blocked``. An explicit kernel that cannot run the case is a ConfigError. Returns the config
    with the concrete choice and a one-line description to log at the start of the run.
    """
    platform = _platform_name(platform)
    impl = cfg.attention_impl
    why = ""
    if impl == "auto":
        fallback = "chunked" if cfg.attention_chunk else "blocked"
        problems: dict[str, str | None] = {}
        if platform == "tpu":
            problems["splash"] = attention_impl_problem(cfg, "splash", platform, seq_len, packed)
        elif platform == "gpu":
            # auto takes cuDNN only for rows known to be unpacked; an explicit choice trusts
            # unknown packing
            problems["cudnn"] = (attention_impl_problem(cfg, "cudnn", platform, seq_len, packed)
                                 or (None if packed is not None else
                                     "needs rows known to be unpacked (data.packing=none)"))
            problems["pallas_gpu"] = attention_impl_problem(cfg, "pallas_gpu", platform, seq_len,
                                                            packed)
        impl, refused = fallback, ""
        for candidate, problem in problems.items():  # in order of preference
            if problem is None:
                impl = candidate
                break
            refused += f"; not {candidate}: it {problem}"
        why = f" (auto on {platform}{', packed rows' if packed else ''}, seq_len {seq_len}{refused})"
    else:
        problem = attention_impl_problem(cfg, impl, platform, seq_len, packed)
        if problem:
            raise ConfigError(f"model.attention_impl={impl!r} {problem}")
    cached = cached_attention_impl(cfg.replace(attention_impl=impl))
    note = "" if impl in ("xla", "chunked") else (
        f"; calls with a KV cache (prefill, decoding) use the {cached} path")
    if impl == "blocked":
        why += f", {attention_block(seq_len, cfg.attention_block_q)} queries per block"
    if impl in KERNEL_IMPLS and impl != "cudnn":
        bq, bkv = kernel_blocks(cfg, impl, seq_len)
        why += f", blocks q={bq} kv={bkv}" + (", interpret mode" if cfg.attention_interpret else "")
    return cfg.replace(attention_impl=impl), f"attention: {impl}{why}{note}"
