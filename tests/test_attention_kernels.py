"""Fused attention kernels against the xla reference (forward and gradients), and the
``model.attention_impl`` choice at config time.

On a CPU the Pallas kernels (Splash, the Pallas GPU kernel) run in interpret mode, the same kernel
code stepped through by XLA; cuDNN cannot run here, so its wiring (lengths from segment ids,
scale, grouped heads) is checked through the same ``jax.nn.dot_product_attention`` call with
``implementation="xla"``, and on a GPU (``bench/device_check.sh``) with cuDNN itself. Shapes are
tiny: interpret mode is slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model import kernels
from free_transformer_jax.model.config import ConfigError, ModelConfig, resolve_attention_impl
from free_transformer_jax.model.layers import dot_product_attention
from free_transformer_jax.model.transformer import FreeTransformer, init_cache
from helpers import tiny_params

ON_GPU = jax.default_backend() == "gpu"
B, T, D = 2, 256, 64
TOL = dict(atol=1e-4, rtol=1e-4)


def kernel_cfg(**kw) -> ModelConfig:
    """A model config whose only role here is to carry the kernel settings (128-blocks)."""
    base = dict(d_model=128, n_heads=2, n_kv_heads=1, head_dim=D, attention_block_q=128,
                attention_block_kv=128, attention_interpret=not ON_GPU)
    return ModelConfig(**{**base, **kw})


def segments(packed: bool) -> jax.Array:
    """(B, T) segment ids: packed rows hold three documents then padding; unpacked rows one
    document then padding (row 1 shorter), the layout cuDNN's lengths express."""
    if packed:
        row = np.concatenate([np.full(70, 1), np.full(100, 2), np.full(60, 3), np.zeros(26)])
        return jnp.asarray(np.stack([row, np.roll(row, 13)]), jnp.int32)
    return jnp.asarray(np.stack([np.r_[np.ones(T - 20), np.zeros(20)],
                                 np.r_[np.ones(T - 90), np.zeros(90)]]), jnp.int32)


def qkv(kv_heads: int, group: int):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, kv_heads, group, D))
    k = jax.random.normal(keys[1], (B, T, kv_heads, D))
    v = jax.random.normal(keys[2], (B, T, kv_heads, D))
    w = jax.random.normal(keys[3], q.shape)
    return q, k, v, w


def reference(q, k, v, seg, causal):
    return dot_product_attention(q, k, v, seg, jnp.arange(T), seg, causal, jnp.float32)


def value_and_grads(fn, q, k, v, w, real):
    """Output and d(sum(out * w))/d(q, k, v), with the cotangent zero where ``real`` is False."""
    mask = real[:, :, None, None, None].astype(q.dtype)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * w * mask)
    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def assert_matches_reference(impl_fn, causal, packed, kv_heads, group, real_only=False,
                             dtype=jnp.float32, tol=TOL):
    """``impl_fn`` on ``dtype`` inputs against the float32 reference on the same values."""
    q, k, v, w = (x.astype(dtype) for x in qkv(kv_heads, group))
    seg = segments(packed)
    real = seg > 0 if real_only else jnp.ones_like(seg, bool)
    out, grads = value_and_grads(lambda q, k, v: impl_fn(q, k, v, seg, causal), q, k, v, w, real)
    q, k, v, w = (x.astype(jnp.float32) for x in (q, k, v, w))
    ref_out, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, seg, causal),
                                         q, k, v, w, real)
    sel = np.asarray(real)
    f32 = lambda a: np.asarray(a, np.float32)
    np.testing.assert_allclose(f32(out)[sel], f32(ref_out)[sel], **tol)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(f32(g), f32(r), err_msg=f"d{name}", **tol)
    # the test means something: attention changes when the mask does
    other = reference(q, k, v, jnp.ones_like(seg), not causal)
    assert float(jnp.max(jnp.abs(other - ref_out))) > 1e-2


def via_kernel(impl, cfg):
    return lambda q, k, v, seg, causal: kernels.kernel_attention(impl, q, k, v, seg, causal, cfg)


# (causal, packed, kv_heads, group): causal packed rows with one kv head (GQA -> MQA kernel),
# the non-causal encoder case with packed rows and two kv heads shared by two queries each.
CASES = [(True, True, 1, 2), (False, True, 2, 2)]


@pytest.mark.parametrize("causal,packed", [(False, True), (True, False)])
def test_splash_mha_kernel_matches_xla(causal, packed):
    """Two kv heads (the MHA kernel reading query heads in groups): non-causal with packed rows,
    and causal with unpacked rows (one document, then padding); the one-kv-head (MQA kernel)
    causal and non-causal cases with packed rows run in the whole-model test below."""
    if ON_GPU:
        pytest.skip("Splash is a TPU kernel")
    cfg = kernel_cfg(n_heads=4, n_kv_heads=2, attention_impl="splash")
    assert_matches_reference(via_kernel("splash", cfg), causal, packed, 2, 2)


@pytest.mark.parametrize("causal,packed,kv_heads,group", CASES)
def test_pallas_gpu_matches_xla(causal, packed, kv_heads, group):
    cfg = kernel_cfg(n_heads=kv_heads * group, n_kv_heads=kv_heads, attention_impl="pallas_gpu")
    assert_matches_reference(via_kernel("pallas_gpu", cfg), causal, packed, kv_heads, group)


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_wiring_matches_xla_on_real_tokens(causal):
    """Unpacked rows with trailing padding; outputs compared at real tokens (padding rows are
    read by nothing), gradients everywhere. cuDNN itself (on a GPU) computes in bfloat16 only:
    its inputs are then bfloat16 and the tolerance is bfloat16's (8 mantissa bits)."""
    cfg = kernel_cfg(n_heads=2, n_kv_heads=1, dtype="bfloat16", attention_impl="cudnn")
    fn = functools.partial(kernels.cudnn_attention, cfg=cfg,
                           implementation="cudnn" if ON_GPU else "xla")
    reshaped = lambda q, k, v, seg, causal: fn(q.reshape(B, T, -1, D), k, v, seg, causal
                                               ).reshape(q.shape)
    if ON_GPU:
        assert_matches_reference(reshaped, causal, False, 1, 2, real_only=True,
                                 dtype=jnp.bfloat16, tol=dict(atol=3e-2, rtol=3e-2))
    else:
        assert_matches_reference(reshaped, causal, False, 1, 2, real_only=True)


def test_splash_sharded_over_a_mesh_matches_xla():
    """Inside shard_map: rows over data, kv heads over tensor (2 x 2 devices)."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    backend = "pallas_gpu" if ON_GPU else "splash"
    cfg = kernel_cfg(n_heads=4, n_kv_heads=2, attention_impl=backend)
    mesh = shard_lib.make_mesh(dict(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    q, k, v, w = qkv(2, 2)
    seg = segments(True)
    with shard_lib.mesh_context(mesh):
        out = jax.jit(lambda q, k, v: kernels.kernel_attention(backend, q, k, v, seg, True, cfg))(
            q, k, v)
    np.testing.assert_allclose(out, reference(q, k, v, seg, True), **TOL)


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=61, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1,
                                 head_dim=D, ffn_dim=128, latent_bits=4, init_std=0.2,
                                 attention_impl="xla"), **kw})


@functools.partial(jax.jit, static_argnums=0)
def model_loss_and_grads(cfg, params, tokens, seg, pos):
    def loss(p):
        logits, aux = FreeTransformer(cfg).apply({"params": p}, tokens, segment_ids=seg,
                                                 positions=pos, rngs={"latent": jax.random.key(3)})
        return jnp.mean(logits**2 * (seg > 0)[..., None]) + jnp.mean(aux["kl"]), (logits, aux)
    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("impl", ["kernel", "blocked"])
def test_model_with_a_kernel_matches_xla(impl):
    """The whole Free Transformer (causal decoder block, injection block with keys/values from
    norm(x + r), non-causal encoder with zeta queries) on packed rows with one kv head, through
    Splash (interpret mode) on a CPU, the Pallas GPU kernel on a GPU, and the blocked pure-JAX
    attention (128 positions in blocks of 64)."""
    t = 128
    ref_cfg = model_cfg()
    params = tiny_params(ref_cfg)
    tokens = jax.random.randint(jax.random.key(1), (B, t), 0, 61)
    seg = jnp.asarray(np.r_[np.full(50, 1), np.full(60, 2), np.zeros(18)][None].repeat(B, 0),
                      jnp.int32)
    pos = jnp.asarray(np.r_[np.arange(50), np.arange(60), np.zeros(18)][None].repeat(B, 0), jnp.int32)
    kernel = ref_cfg.replace(attention_impl="pallas_gpu" if ON_GPU else "splash",
                             attention_interpret=not ON_GPU, attention_block_q=128,
                             attention_block_kv=128)
    if impl == "blocked":
        kernel = ref_cfg.replace(attention_impl="blocked")
    (l1, (lg1, aux1)), g1 = model_loss_and_grads(kernel, params, tokens, seg, pos)
    (l0, (lg0, aux0)), g0 = model_loss_and_grads(ref_cfg, params, tokens, seg, pos)
    np.testing.assert_allclose(lg1, lg0, **TOL)
    np.testing.assert_allclose(aux1["bit_logits"], aux0["bit_logits"], **TOL)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g1),
                          jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path[0]), **TOL)


def test_choice_scoring_pads_rows_to_a_length_the_kernel_takes():
    """Choice rows are as long as their text (here 9-19 tokens); scoring pads them (segment id 0)
    to a length an explicit kernel takes, and the scores are those of xla at the rows' own
    lengths (the baseline: no Z, so the padding changes no random draw)."""
    from free_transformer_jax import evaluate as eval_lib
    from free_transformer_jax.data.tokenizers import ByteTokenizer

    assert kernels.kernel_length(kernel_cfg(attention_impl="splash", attention_interpret=True),
                                 37) == 128
    assert kernels.kernel_length(model_cfg(), 37) == 37
    ref_cfg = model_cfg(latent=False, vocab_size=ByteTokenizer().vocab_size)
    params = tiny_params(ref_cfg)
    kernel = ref_cfg.replace(attention_impl="pallas_gpu" if ON_GPU else "splash",
                             attention_interpret=not ON_GPU, attention_block_q=128,
                             attention_block_kv=128)
    examples = [{"context": "the cat", "choices": ["sat", "ran away"], "label": 0},
                {"context": "one two", "choices": ["three four", "x"], "label": 1}]
    scores = [eval_lib.score_choices(c, params, examples, ByteTokenizer(), key=jax.random.key(0),
                                     z_samples=1, batch_size=4)
              for c in (kernel, ref_cfg)]
    for a, b in zip(scores[0]["per_example"], scores[1]["per_example"]):
        np.testing.assert_allclose(a["loglik"], b["loglik"], **TOL)


def test_decoding_with_a_cache_uses_the_xla_path():
    """A kernel config decodes (prefill + one token through the KV cache) exactly as xla."""
    ref_cfg = model_cfg()
    params = tiny_params(ref_cfg)
    kernel = ref_cfg.replace(attention_impl="pallas_gpu" if ON_GPU else "splash",
                             attention_interpret=not ON_GPU)
    prompt = jax.random.randint(jax.random.key(4), (B, 5), 0, 61)

    @functools.partial(jax.jit, static_argnums=0)
    def decode(cfg):
        model = FreeTransformer(cfg)
        logits, aux = model.apply({"params": params}, prompt, cache=init_cache(cfg, B, 8),
                                  rngs={"latent": jax.random.key(5)})
        nxt, _ = model.apply({"params": params}, prompt[:, :1], latent=aux["codes"][:, -1:],
                             cache=aux["cache"])
        return logits, nxt

    for a, b in zip(decode(kernel), decode(ref_cfg)):
        np.testing.assert_array_equal(a, b)


# ---- the choice at config time ----------------------------------------------------------------

@pytest.mark.parametrize("platform,packed,dtype,expected", [
    ("tpu", True, "bfloat16", "splash"),
    ("gpu", False, "bfloat16", "cudnn"),
    ("gpu", True, "bfloat16", "pallas_gpu"),
    ("gpu", False, "float32", "pallas_gpu"),  # cuDNN flash attention has no float32
    ("cpu", True, "float32", "blocked"),
])
def test_auto_picks_the_kernel_for_the_platform(platform, packed, dtype, expected):
    cfg = model_cfg(attention_impl="auto", dtype=dtype)
    resolved, line = resolve_attention_impl(cfg, platform, seq_len=4096, packed=packed)
    assert resolved.attention_impl == expected
    assert line.startswith(f"attention: {expected} (auto on {platform}")
    if expected != "xla":
        assert "KV cache" in line and "xla path" in line


def test_auto_on_cpu_with_a_chunk_is_chunked_and_auto_falls_back_on_odd_lengths():
    cfg = model_cfg(attention_impl="auto", attention_chunk=256)
    assert resolve_attention_impl(cfg, "cpu", seq_len=4096, packed=True)[0].attention_impl == "chunked"
    # Splash needs 128-multiples: auto takes the chunked path and says so
    resolved, line = resolve_attention_impl(cfg, "tpu", seq_len=65, packed=True)
    assert resolved.attention_impl == "chunked" and "seq_len 65" in line
    assert "not splash: it needs a sequence length that is a multiple of 128, not 65" in line
    # on a GPU, float32 packed rows: why not cuDNN, then the Pallas kernel
    resolved, line = resolve_attention_impl(cfg, "gpu", seq_len=256, packed=True)
    assert resolved.attention_impl == "pallas_gpu"
    assert "not cudnn: it needs model.dtype bfloat16 or float16, not float32" in line and "not pallas" not in line
    bf16 = cfg.replace(dtype="bfloat16")
    for packed, why in ((True, "cannot express packed rows"), (None, "known to be unpacked")):
        resolved, line = resolve_attention_impl(bf16, "gpu", seq_len=256, packed=packed)
        assert resolved.attention_impl == "pallas_gpu" and why in line
    resolved, line = resolve_attention_impl(bf16, "gpu", seq_len=256, packed=False)
    assert resolved.attention_impl == "cudnn" and "not " not in line.split(";")[0]
    resolved, line = resolve_attention_impl(bf16.replace(head_dim=12), "gpu", seq_len=256,
                                            packed=False)
    assert resolved.attention_impl == "pallas_gpu"
    assert "not cudnn: it needs a head_dim that is a multiple of 8 and <= 256, not 12" in line


@pytest.mark.parametrize("kw,platform,seq_len,packed,match", [
    (dict(attention_impl="splash"), "cpu", 256, True, "runs on TPU only.*attention_interpret"),
    (dict(attention_impl="splash"), "tpu", 200, True, "multiple of 128"),
    (dict(attention_impl="splash", attention_block_q=512), "tpu", 640, True, "multiple of its blocks"),
    (dict(attention_impl="splash", attention_block_q=64), "tpu", 256, True, "blocks that are multiples of 128"),
    (dict(attention_impl="cudnn", dtype="bfloat16"), "gpu", 256, True, "cannot express packed rows"),
    (dict(attention_impl="cudnn", dtype="bfloat16"), "tpu", 256, False, "runs on GPU only"),
    (dict(attention_impl="pallas_gpu"), "tpu", 256, True, "runs on GPU only"),
])
def test_a_kernel_that_cannot_run_the_case_is_a_config_error(kw, platform, seq_len, packed, match):
    with pytest.raises(ConfigError, match=f"^model.attention_impl='{kw['attention_impl']}' .*{match}"):
        resolve_attention_impl(model_cfg(**kw), platform, seq_len=seq_len, packed=packed)


@pytest.mark.parametrize("kw,match", [
    (dict(attention_impl="flash"), "attention_impl='flash': must be one of"),
    (dict(attention_impl="chunked"), "needs model.attention_chunk > 0"),
    (dict(attention_impl="cudnn"), "needs model.dtype bfloat16 or float16"),
    (dict(attention_impl="cudnn", dtype="bfloat16", head_dim=12), "multiple of 8 and <= 256, not 12"),
    (dict(attention_block_q=-1), "attention_block_q=-1: must be 0"),
])
def test_invalid_attention_fields_fail_with_the_field_name(kw, match):
    with pytest.raises(ConfigError, match=match):
        model_cfg(**kw)


def test_a_kernel_at_another_length_fails_at_trace_time_with_one_line():
    cfg = kernel_cfg(attention_impl="splash", attention_interpret=True)
    q, k, v, _ = qkv(1, 2)
    with pytest.raises(ConfigError, match="multiple of 128, not 200"):
        kernels.kernel_attention("splash", q[:, :200], k[:, :200], v[:, :200],
                                 segments(True)[:, :200], True, cfg)
