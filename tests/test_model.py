"""Model behaviour (BUILD_NOTES.md, "Model"): causality, the encoder, the baseline, scan/unroll and remat."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_transformer_jax.model.config import ConfigError, ModelConfig
from free_transformer_jax.model.transformer import FreeTransformer, stack_unrolled
from free_transformer_jax.train.loss import loss_and_metrics
from helpers import tiny_config, tiny_params

B, T = 2, 12


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    params = tiny_params(cfg)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    return cfg, params, tokens


@functools.partial(jax.jit, static_argnums=(0, 3))
def _run(cfg, params, tokens, mode, codes, seed):
    return FreeTransformer(cfg).apply({"params": params}, tokens, latent=mode if codes is None else codes,
                                      rngs={"latent": jax.random.key(seed)})


def run(cfg, params, tokens, latent="posterior", seed=7):
    if isinstance(latent, str):
        return _run(cfg, params, tokens, latent, None, seed)
    return _run(cfg, params, tokens, "codes", latent, seed)


def test_causality_with_fixed_z(setup):
    cfg, params, tokens = setup
    codes = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.num_codes)
    logits, _ = run(cfg, params, tokens, latent=codes)
    j = 7
    changed = tokens.at[:, j].set((tokens[:, j] + 1) % cfg.vocab_size)
    logits2, _ = run(cfg, params, changed, latent=codes)
    np.testing.assert_array_equal(logits[:, :j], logits2[:, :j])
    assert float(jnp.max(jnp.abs(logits[:, j:] - logits2[:, j:]))) > 1e-3


def test_encoder_is_non_causal(setup):
    cfg, params, tokens = setup
    _, aux = run(cfg, params, tokens)
    changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % cfg.vocab_size)
    _, aux2 = run(cfg, params, changed)
    # the last token changes the bit logits of the first position
    assert float(jnp.max(jnp.abs(aux["bit_logits"][:, 0] - aux2["bit_logits"][:, 0]))) > 1e-4


def test_encoder_sees_positions(setup):
    cfg, params, _ = setup
    same = jnp.full((1, T), 5, jnp.int32)
    _, aux = run(cfg, params, same)
    logits = np.asarray(aux["bit_logits"][0])  # (T, H)
    spread = np.abs(logits[:, None, :] - logits[None, :, :]).max(-1)
    off_diag = spread[~np.eye(T, dtype=bool)]
    assert off_diag.min() > 1e-3, "two positions got identical posteriors on a constant sequence"


def test_posterior_codes_are_sampled_not_thresholded(setup):
    cfg, params, tokens = setup
    codes = [run(cfg, params, tokens, seed=s)[1]["codes"] for s in range(4)]
    assert any(not np.array_equal(codes[0], c) for c in codes[1:])


def test_zero_table_equals_baseline(setup):
    cfg, params, tokens = setup
    base_cfg = cfg.replace(latent=False)
    base_params = tiny_params(base_cfg)
    assert "encoder" not in base_params and "post_sampler" not in base_params
    assert set(params) - set(base_params) == {"encoder", "post_sampler"}
    assert (jax.tree.structure(base_params) ==
            jax.tree.structure({k: v for k, v in params.items() if k in base_params}))
    shared = {k: v for k, v in params.items() if k in base_params}
    zeroed = {**params, "post_sampler": jnp.zeros_like(params["post_sampler"])}
    ft_logits, _ = run(cfg, zeroed, tokens)
    base_logits, base_aux = run(base_cfg, shared, tokens)
    np.testing.assert_allclose(ft_logits, base_logits, rtol=1e-6, atol=1e-6)
    assert "kl" not in base_aux
    # ...and the table matters when it is not zero
    ft_logits2, _ = run(cfg, params, tokens)
    assert float(jnp.max(jnp.abs(ft_logits2 - base_logits))) > 1e-3


def test_prior_mode_and_given_codes_agree(setup):
    cfg, params, tokens = setup
    _, aux = run(cfg, params, tokens, latent="prior")
    assert "kl" not in aux and aux["codes"].shape == (B, T)
    logits_prior, _ = run(cfg, params, tokens, latent="prior")
    logits_given, _ = run(cfg, params, tokens, latent=aux["codes"])
    np.testing.assert_allclose(logits_prior, logits_given, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="latent="):
        run(cfg, params, tokens, latent="argmax")


def _loss(cfg, params, tokens, seed=3):
    logits, aux = run(cfg, params, tokens[:, :-1], seed=seed)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    return loss_and_metrics(cfg, logits, aux, batch)[0]


def test_fused_and_dense_model_gradients_match(setup):
    cfg, params, tokens = setup
    g_fused = jax.jit(jax.grad(lambda p: _loss(cfg, p, tokens)))(params)
    g_dense = jax.jit(jax.grad(lambda p: _loss(cfg.replace(latent_impl="dense"), p, tokens)))(params)
    flat_f, flat_d = jax.tree.leaves(g_fused), jax.tree.leaves(g_dense)
    for a, b in zip(flat_f, flat_d):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # gradient reaches the encoder (through the KL and through the mapper's pass-through)
    assert float(jnp.max(jnp.abs(g_fused["encoder"]["bits"]))) > 1e-4
    assert float(jnp.max(jnp.abs(g_fused["encoder"]["zeta"]))) > 1e-6


def test_scan_and_unrolled_match(setup):
    cfg, params, tokens = setup
    unrolled_cfg = cfg.replace(scan_layers=False)
    unrolled_params = tiny_params(unrolled_cfg, seed=5)
    assert "layers_0" in unrolled_params["lower"]
    scanned = stack_unrolled(unrolled_params)
    assert jax.tree.structure(scanned) == jax.tree.structure(params)
    a, aux_a = run(unrolled_cfg, unrolled_params, tokens)
    b, aux_b = run(cfg, scanned, tokens)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(aux_a["codes"], aux_b["codes"])


@pytest.mark.parametrize("policy,scan", [("full", True), ("save_dots", True), ("full", False)])
def test_remat_gives_same_gradients(setup, policy, scan):
    cfg, params, tokens = setup
    if not scan:
        from free_transformer_jax.model.transformer import unstack_layers
        params = unstack_layers(params)
    base = cfg.replace(scan_layers=scan)
    g0 = jax.jit(jax.grad(lambda p: _loss(base, p, tokens)))(params)
    g1 = jax.jit(jax.grad(lambda p: _loss(base.replace(remat_policy=policy), p, tokens)))(params)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32(setup):
    cfg, params, tokens = setup
    codes = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.num_codes)
    a, _ = run(cfg, params, tokens, latent=codes)
    b, _ = run(cfg.replace(dtype="bfloat16"), params, tokens, latent=codes)
    assert b.dtype == jnp.float32  # logits stay float32
    assert float(jnp.max(jnp.abs(a - b))) < 0.1 * float(jnp.max(jnp.abs(a)))


@pytest.mark.parametrize("field,value,match", [
    ("n_kv_heads", 3, "n_kv_heads"), ("inject_layer", 4, "inject_layer"),
    ("latent_impl", "sparse", "latent_impl"), ("remat_policy", "some", "remat_policy"),
    ("latent_code_chunk", 3, "latent_code_chunk"), ("dtype", "fp8", "dtype"),
    ("kappa_bits", -1.0, "kappa_bits")])
def test_invalid_config_fails_with_field_name(field, value, match):
    with pytest.raises(ConfigError, match=f"model.{match}"):
        tiny_config(**{field: value})


def test_unknown_config_field_is_an_error():
    with pytest.raises(ConfigError, match="kapa_bits"):
        ModelConfig.from_dict({"kapa_bits": 1.0})


_PACKED_SEG = np.repeat([[1] * 5 + [2] * 7], B, axis=0)
_PACKED_POS = np.repeat([list(range(5)) + list(range(7))], B, axis=0)


@functools.partial(jax.jit, static_argnums=0)
def _packed_loss_and_grad(cfg, params, tokens):
    def loss(p):
        logits, aux = FreeTransformer(cfg).apply(
            {"params": p}, tokens, segment_ids=jnp.asarray(_PACKED_SEG, jnp.int32),
            positions=jnp.asarray(_PACKED_POS, jnp.int32), rngs={"latent": jax.random.key(0)})
        return jnp.mean(logits ** 2) + jnp.mean(aux["kl"]), (logits, aux["bit_logits"])

    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("chunk", [4, 5])
def test_chunked_attention_equals_dense(setup, chunk):
    """Query-chunked attention (causal decoder, non-causal encoder, packed segments) gives the
    same logits, bit logits and gradients as the dense form (``xla``), also when the chunk does
    not divide the length (T = 12, chunk 5: chunks of 5, 5 and 2)."""
    cfg, params, tokens = setup
    assert T == 12
    (l0, (lg0, bl0)), g0 = _packed_loss_and_grad(cfg.replace(attention_impl="xla"), params, tokens)
    chunked = cfg.replace(attention_impl="chunked", attention_chunk=chunk)
    (l1, (lg1, bl1)), g1 = _packed_loss_and_grad(chunked, params, tokens)
    np.testing.assert_allclose(lg1, lg0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bl1, bl0, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
