"""The binary mapper, post-sampler and KL (model/latent.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_transformer_jax.model import latent as L
from helpers import tiny_config


def test_code_index_is_little_endian_sum_of_bits():
    bits = jnp.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
    np.testing.assert_array_equal(L.bits_to_codes(bits), [1 + 4 + 8, 0, 15, 2])
    codes = jnp.arange(16)
    np.testing.assert_array_equal(L.bits_to_codes(L.codes_to_bits(codes, 4)), codes)
    # the bit table's row d holds the bits of code d
    np.testing.assert_array_equal(L.bit_table(0, 16, 4), L.codes_to_bits(codes, 4))
    # sampling with saturated logits is deterministic and packs bit h into 2**h
    logits = jnp.array([[[30.0, -30.0, 30.0, 30.0, -30.0]]])
    assert int(L.sample_codes(jax.random.key(0), logits)[0, 0]) == 1 + 4 + 8


def test_bit_frequencies_match_sigmoid():
    logits = jnp.array([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    n = 40_000
    codes = L.sample_codes(jax.random.key(1), jnp.broadcast_to(logits, (1, n, 6)))
    freq = np.asarray(L.codes_to_bits(codes, 6)).reshape(n, 6).mean(0)
    p = np.asarray(jax.nn.sigmoid(logits))
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) < 5 * sigma + 1e-9), (freq, p)


def _problem(n_bits, seed=0, b=2, t=11, d=6):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    logits = 1.5 * jax.random.normal(k1, (b, t, n_bits))
    table = jax.random.normal(k2, (2**n_bits, d))
    codes = L.sample_codes(k3, logits)
    probe = jax.random.normal(k4, (b, t, d))
    return logits, table, codes, probe


def _grads(fn, logits, table, codes, probe):
    loss = lambda l, w: jnp.sum(jnp.sin(fn(l, w, codes)) * probe)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(logits, table)


@pytest.mark.parametrize("n_bits", [4, 8])
def test_fused_equals_dense_value_and_gradients(n_bits):
    logits, table, codes, probe = _problem(n_bits)
    v_dense, (dl_dense, dw_dense) = _grads(L.dense_post_sampler, logits, table, codes, probe)
    fused = lambda l, w, c: L.fused_post_sampler(l, w, c, 4, 0)
    v_fused, (dl_fused, dw_fused) = _grads(fused, logits, table, codes, probe)
    np.testing.assert_allclose(v_fused, v_dense, rtol=1e-6)
    # the forward value is a gather of the sampled rows
    np.testing.assert_allclose(L.fused_post_sampler(logits, table, codes), table[codes], rtol=0)
    scale = lambda a: float(jnp.max(jnp.abs(a)))
    assert scale(dl_dense) > 1e-3  # the bit logits really receive gradient through G
    np.testing.assert_allclose(dl_fused, dl_dense, rtol=1e-5, atol=1e-5 * scale(dl_dense))
    np.testing.assert_allclose(dw_fused, dw_dense, rtol=1e-5, atol=1e-5 * scale(dw_dense))
    # only the sampled rows of W receive gradient
    untouched = np.setdiff1d(np.arange(2**n_bits), np.asarray(codes).ravel())
    assert untouched.size and np.all(np.asarray(dw_fused)[untouched] == 0)


def test_logit_gradient_uses_the_full_probability_vector():
    """Gradient through only the sampled code's probability differs from the paper's (Eq. 8)."""
    logits, table, codes, probe = _problem(4, seed=3)
    _, (dl_full, _) = _grads(L.dense_post_sampler, logits, table, codes, probe)

    def sampled_only(l, w, c):
        g_full = jnp.exp(L.log_code_probs(l.reshape(-1, 4), L.bit_table(0, 16, 4))).reshape(l.shape[:2] + (16,))
        g_c = jnp.take_along_axis(g_full, c[..., None], -1)
        return w[c] * (1 + g_c - jax.lax.stop_gradient(g_c))

    _, (dl_wrong, _) = _grads(sampled_only, logits, table, codes, probe)
    assert float(jnp.max(jnp.abs(dl_wrong - dl_full))) > 1e-2


@pytest.mark.parametrize("token_chunk,code_chunk", [(1, 0), (3, 16), (7, 64), (0, 32), (256, 128)])
def test_fused_gradient_independent_of_chunking(token_chunk, code_chunk):
    logits, table, codes, probe = _problem(8, seed=1)
    ref = _grads(lambda l, w, c: L.fused_post_sampler(l, w, c, 0, 0), logits, table, codes, probe)[1]
    got = _grads(lambda l, w, c: L.fused_post_sampler(l, w, c, token_chunk, code_chunk),
                 logits, table, codes, probe)[1]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_bits", [1, 3, 6])
def test_kl_closed_form_equals_enumeration(n_bits):
    logits = 2.0 * jax.random.normal(jax.random.key(n_bits), (3, 5, n_bits))
    closed = L.kl_per_token(logits)
    n = 2**n_bits
    log_g = L.log_code_probs(logits.reshape(-1, n_bits), L.bit_table(0, n, n_bits))
    brute = jnp.sum(jnp.exp(log_g) * (log_g + math.log(n)), axis=-1).reshape(3, 5)
    np.testing.assert_allclose(closed, brute, rtol=1e-5, atol=1e-6)
    # bounds: 0 at uniform bits, H ln 2 at saturated bits
    assert float(L.kl_per_token(jnp.zeros((1, 1, n_bits)))[0, 0]) == pytest.approx(0.0, abs=1e-7)
    assert float(L.kl_per_token(jnp.full((1, 1, n_bits), 40.0))[0, 0]) == pytest.approx(
        n_bits * math.log(2), rel=1e-5)


def test_free_bits_hinge_is_per_token():
    kl = jnp.array([[0.1, 2.0]])
    kappa = 0.5
    # per token: (0 + 1.5) / 2; a hinge on the mean would give max(0, 1.05 - 0.5) = 0.55
    assert float(L.free_bits_kl(kl, kappa)) == pytest.approx(0.75)
    mask = jnp.array([[1.0, 0.0]])
    assert float(L.free_bits_kl(kl, kappa, mask)) == pytest.approx(0.0)
    assert float(L.free_bits_kl(jnp.array([[3.0, 1.0, 0.0]]), 1.0, jnp.array([[1, 1, 1]]))) == \
        pytest.approx(2.0 / 3)


def test_training_loss_kl_term_is_the_free_bits_kl():
    from free_transformer_jax.train.loss import loss_and_metrics

    cfg = tiny_config(kappa_bits=1.0, kl_weight=2.0)
    kl = jnp.array([[0.1, 2.0, 1.5, 0.0]])
    seg = jnp.array([[1, 1, 1, 0]])  # the last position is padding: no latent, no target
    batch = {"inputs": jnp.zeros((1, 4), jnp.int32), "targets": jnp.zeros((1, 4), jnp.int32),
             "segment_ids": seg}
    logits = jnp.zeros((1, 4, cfg.vocab_size))  # uniform: CE = log V
    loss, m = loss_and_metrics(cfg, logits, {"kl": kl}, batch)
    kappa = math.log(2.0)  # 1 bit in nats
    expected = (0.0 + (2.0 - kappa) + (1.5 - kappa)) / 3
    assert float(m["kl_term"]) == pytest.approx(expected, rel=1e-6)
    assert float(loss) == pytest.approx(math.log(cfg.vocab_size) + 2.0 * expected, rel=1e-6)
    # micro-batch shares divided by the whole batch's latent count add up to the whole term
    shares = [L.free_bits_kl(kl[:, s], kappa, seg[:, s], jnp.float32(3.0))
              for s in (slice(0, 2), slice(2, 4))]
    assert float(sum(shares)) == pytest.approx(expected, rel=1e-6)


def test_aggregate_kl_against_enumeration():
    """The ablation knob's term: KL of the batch-averaged posterior at each position from the
    uniform prior, averaged over positions, checked against a numpy enumeration; the per-bit form
    is a lower bound; padding rows and empty positions drop out."""
    n_bits, b, t = 4, 6, 3
    logits = 1.5 * jax.random.normal(jax.random.key(3), (b, t, n_bits))
    mask = np.ones((b, t), np.float32)
    mask[4:, 1] = 0.0  # rows 4, 5 are padding at position 1
    mask[:, 2] = 0.0  # nobody at position 2
    p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    codes = (np.arange(2**n_bits)[:, None] >> np.arange(n_bits)) & 1  # (C, H)
    g = np.prod(np.where(codes[None, None], p[:, :, None], 1 - p[:, :, None]), axis=-1)  # (B,T,C)
    want = []
    for pos in range(2):
        rows = mask[:, pos] > 0
        q = g[rows, pos].mean(axis=0)
        want.append(np.sum(q * np.log(q * 2**n_bits)))
    exact = float(L.aggregate_kl(logits, jnp.asarray(mask), "codes"))
    assert exact == pytest.approx(np.mean(want), rel=1e-5)
    q = np.asarray(L.aggregate_posterior(logits, jnp.asarray(mask)))
    np.testing.assert_allclose(q[1], g[:4, 1].mean(axis=0), rtol=1e-5, atol=1e-7)
    bits = float(L.aggregate_kl(logits, jnp.asarray(mask), "bits"))
    assert 0.0 < bits < exact
    # one row, independent bits: the aggregate is that row's posterior, and both forms give its KL
    one = logits[:1, :2]
    np.testing.assert_allclose(float(L.aggregate_kl(one, form="codes")),
                               float(jnp.mean(L.kl_per_token(one))), rtol=1e-5)
    np.testing.assert_allclose(float(L.aggregate_kl(one, form="bits")),
                               float(jnp.mean(L.kl_per_token(one))), rtol=1e-5)
    # two opposite certain posteriors (H = 1) average to the uniform prior: aggregate KL 0, though
    # each row's own KL is ln 2 (all of it information)
    flip = jnp.stack([jnp.full((1, 1), 30.0), jnp.full((1, 1), -30.0)])  # (2, 1, 1): H = 1
    assert float(L.aggregate_kl(flip, form="codes")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="needs H <= 12"):
        L.aggregate_kl(jnp.zeros((1, 1, 13)), form="codes")
    assert float(L.aggregate_kl(jnp.zeros((1, 1, 13)), form="bits")) == pytest.approx(0.0, abs=1e-6)


def test_training_loss_adds_the_aggregate_kl_when_asked():
    from free_transformer_jax.model.config import ConfigError
    from free_transformer_jax.train.loss import loss_and_metrics

    logits_bits = jax.random.normal(jax.random.key(1), (2, 3, 4))
    batch = {"inputs": jnp.zeros((2, 3), jnp.int32), "targets": jnp.zeros((2, 3), jnp.int32)}
    aux = {"kl": L.kl_per_token(logits_bits), "bit_logits": logits_bits}
    logits = jnp.zeros((2, 3, 16))
    off, m_off = loss_and_metrics(tiny_config(latent_bits=4), logits, aux, batch)
    on, m_on = loss_and_metrics(tiny_config(latent_bits=4, aggregate_kl_weight=0.5), logits, aux, batch)
    agg = float(L.aggregate_kl(logits_bits))
    assert agg > 0 and "aggregate_kl_bits" not in m_off
    assert float(on) == pytest.approx(float(off) + 0.5 * agg, rel=1e-6)
    assert float(m_on["aggregate_kl_bits"]) == pytest.approx(agg / math.log(2.0), rel=1e-6)
    with pytest.raises(ConfigError, match="aggregate_kl_form"):
        tiny_config(latent_bits=16, aggregate_kl_weight=1.0)
    with pytest.raises(ConfigError, match="aggregate_kl_ramp_steps"):
        tiny_config(latent_bits=4, aggregate_kl_weight=1.0, aggregate_kl_ramp_steps=-1)


def test_batch_scope_free_bits_hinge_the_batch_mean():
    from free_transformer_jax.train.loss import loss_and_metrics

    kl = jnp.array([[3.0, 0.2], [0.0, 0.2], [0.0, 9.0]])  # (B=3, T=2)
    mask = jnp.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # row 2 is padding at position 1
    # position 0: mean 1.0 -> 0.5 over kappa; position 1: mean 0.2 -> free; then mean over 2
    assert float(L.batch_free_bits_kl(kl, 0.5, mask)) == pytest.approx(0.25)
    # the paper's per-token form charges row 0's 3.0 at position 0 in full
    assert float(L.free_bits_kl(kl, 0.5, mask)) == pytest.approx(2.5 / 5)
    cfg = tiny_config(kappa_bits=0.5 / math.log(2.0), free_bits_scope="batch")
    batch = {"inputs": jnp.zeros((3, 2), jnp.int32), "targets": jnp.zeros((3, 2), jnp.int32),
             "segment_ids": mask.astype(jnp.int32)}
    _, m = loss_and_metrics(cfg, jnp.zeros((3, 2, cfg.vocab_size)), {"kl": kl}, batch)
    assert float(m["kl_term"]) == pytest.approx(0.25, rel=1e-5)


def test_prior_codes_cover_the_code_space_uniformly():
    codes = np.asarray(L.prior_codes(jax.random.key(0), (20_000,), 3))
    counts = np.bincount(codes, minlength=8)
    assert codes.min() >= 0 and codes.max() <= 7
    assert np.all(np.abs(counts / 20_000 - 1 / 8) < 0.015)
