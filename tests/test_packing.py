"""The model honours packed rows (BUILD_NOTES.md, "Windows and packing"): documents packed into one
row by the data pipeline give the same logits, encoder bit logits, KL and loss as the same documents
run alone."""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_transformer_jax.data import pipeline
from free_transformer_jax.model.transformer import FreeTransformer
from free_transformer_jax.train.loss import loss_and_metrics
from helpers import tiny_config, tiny_params

ROW = 20
N_DOCS, DOC_LEN = 3, 6  # 3 x 5 = 15 scored positions in a row of 20: 3 segments + padding
# Equal lengths let the documents run alone as one unpadded (3, 5) batch: every comparison reuses
# the same four compiled functions (packed/alone x fixed codes/posterior).


@functools.partial(jax.jit, static_argnums=(0, 2))
def _apply(cfg, params, mode, tokens, codes, seg, pos):
    return FreeTransformer(cfg).apply({"params": params}, tokens, latent=mode if codes is None else codes,
                                      segment_ids=seg, positions=pos,
                                      rngs={"latent": jax.random.key(0)})


def apply(cfg, params, tokens, *, codes=None, seg=None, pos=None):
    """Without seg/pos: one document per row (all ones, 0..T-1)."""
    tokens = jnp.asarray(tokens)
    seg = jnp.ones(tokens.shape, jnp.int32) if seg is None else jnp.asarray(seg)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if pos is None else jnp.asarray(pos)
    mode = "posterior" if codes is None else "codes"
    return _apply(cfg, params, mode, tokens, None if codes is None else jnp.asarray(codes), seg, pos)


def packed_row(docs, seq_len=ROW, packing="first_fit"):
    ds = grain.MapDataset.source(docs).to_iter_dataset()
    batches = list(pipeline.pack_and_batch(ds, seq_len=seq_len, packing=packing, batch_size=1,
                                           training=False, pad_id=0))
    assert len(batches) == 1
    return batches[0]


@pytest.fixture(scope="module")
def setup():
    # The Free Transformer with Z fixed exercises every block the baseline has, plus the encoder.
    params = tiny_params(tiny_config())  # kappa only enters the loss: share test_model's init
    cfg = tiny_config(kappa_bits=0.0)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, cfg.vocab_size, DOC_LEN).astype(np.int32) for _ in range(N_DOCS)]
    # one fixed code per position of each document (its inputs, i.e. all tokens but the last)
    codes = [rng.integers(0, cfg.num_codes, DOC_LEN - 1).astype(np.int32) for _ in range(N_DOCS)]
    return cfg, params, docs, codes


def alone(cfg, params, docs, codes=None):
    """Each document in its own row, unpacked and unpadded."""
    inputs = np.stack([d[:-1] for d in docs])
    return apply(cfg, params, inputs, codes=None if codes is None else np.stack(codes))


def pack_codes(batch, codes, rng_seed=1):
    """The codes of each document at its positions in the packed row; random codes on padding."""
    seg = batch["segment_ids"][0]
    out = np.random.default_rng(rng_seed).integers(0, 2**4, seg.shape).astype(np.int32)
    for j, c in enumerate(codes):
        out[seg == j + 1] = c
    return jnp.asarray(out[None])


def test_packed_row_layout(setup):
    _, _, docs, _ = setup
    b = packed_row(docs)
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * 5 + [2] * 5 + [3] * 5 + [0] * 5)
    np.testing.assert_array_equal(b["positions"][0], list(range(5)) * 3 + [0] * 5)


def test_packed_logits_equal_per_document_logits(setup):
    cfg, params, docs, codes = setup
    b = packed_row(docs)
    b_tokens = b["inputs"].copy()
    b_tokens[b["segment_ids"] == 0] = 13  # padding content must not matter
    logits, _ = apply(cfg, params, b_tokens, codes=pack_codes(b, codes), seg=jnp.asarray(b["segment_ids"]),
                      pos=jnp.asarray(b["positions"]))
    seg = b["segment_ids"][0]
    ref, _ = alone(cfg, params, docs, codes)
    for j in range(N_DOCS):
        np.testing.assert_allclose(np.asarray(logits[0][seg == j + 1]), np.asarray(ref[j]),
                                   atol=1e-5, rtol=0)
    # the comparison is sharp: ignoring segments (one causal sequence) changes later documents
    mixed, _ = apply(cfg, params, b_tokens, codes=pack_codes(b, codes), seg=np.ones_like(b["segment_ids"]))
    assert float(jnp.max(jnp.abs(mixed[0][seg == 2] - logits[0][seg == 2]))) > 1e-3


def test_packed_encoder_sees_only_its_document(setup):
    cfg, params, docs, _ = setup
    b = packed_row(docs)
    seg_ids, pos = jnp.asarray(b["segment_ids"]), jnp.asarray(b["positions"])
    _, aux = apply(cfg, params, b["inputs"], seg=seg_ids, pos=pos)
    seg = b["segment_ids"][0]
    _, ref = alone(cfg, params, docs)
    for j in range(N_DOCS):
        for key in ("bit_logits", "kl"):
            np.testing.assert_allclose(np.asarray(aux[key][0][seg == j + 1]), np.asarray(ref[key][j]),
                                       atol=1e-5, rtol=0, err_msg=key)
    # a token of document 3 changes document 3's bit logits but not those of documents 1 and 2
    changed = b["inputs"].copy()
    changed[0, np.flatnonzero(seg == 3)[-1]] = (changed[0, np.flatnonzero(seg == 3)[-1]] + 1) % 61
    _, aux2 = apply(cfg, params, changed, seg=seg_ids, pos=pos)
    np.testing.assert_array_equal(aux["bit_logits"][0][seg < 3], aux2["bit_logits"][0][seg < 3])
    assert float(jnp.max(jnp.abs(aux["bit_logits"][0][seg == 3] - aux2["bit_logits"][0][seg == 3]))) > 1e-5


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_loss_with_padding_equals_loss_without(setup, packing):
    """The documents as unpadded rows vs packed in one padded row: same loss and metrics."""
    cfg, params, docs, codes = setup
    plain = {"inputs": np.stack([d[:-1] for d in docs]), "targets": np.stack([d[1:] for d in docs])}
    logits_a, _ = alone(cfg, params, docs, codes)
    _, post_a = alone(cfg, params, docs)

    b = dict(packed_row(docs, packing=packing))
    n = N_DOCS * (DOC_LEN - 1)
    assert b["loss_mask"].sum() == n and (b["segment_ids"] == 0).sum() == ROW - n
    b["inputs"] = np.where(b["segment_ids"] > 0, b["inputs"], 7)  # garbage on padding
    b["targets"] = np.where(b["segment_ids"] > 0, b["targets"], 9)
    seg, pos = b["segment_ids"], b["positions"]
    logits_b, _ = apply(cfg, params, b["inputs"], codes=pack_codes(b, codes), seg=seg, pos=pos)
    _, post_b = apply(cfg, params, b["inputs"], seg=seg, pos=pos)

    loss_a, m_a = loss_and_metrics(cfg, logits_a, {"kl": post_a["kl"]}, plain)
    loss_b, m_b = loss_and_metrics(cfg, logits_b, {"kl": post_b["kl"]}, b)
    assert float(m_a["n_tokens"]) == float(m_b["n_tokens"]) == n
    for k in m_a:
        np.testing.assert_allclose(float(m_b[k]), float(m_a[k]), atol=1e-5, rtol=0, err_msg=k)
    np.testing.assert_allclose(float(loss_b), float(loss_a), atol=1e-5, rtol=0)
    assert float(m_a["kl_term"]) > 0  # kappa = 0: the KL term is live and compared too
    # without the masks the padded row's loss differs: the test can fail
    unmasked = {"inputs": b["inputs"], "targets": b["targets"]}
    loss_c, _ = loss_and_metrics(cfg, logits_b, {"kl": post_b["kl"]}, unmasked)
    assert abs(float(loss_c) - float(loss_a)) > 1e-3
