"""Parity with Hugging Face transformers' LlamaForCausalLM through from_hf_llama (BUILD_NOTES.md,
"HF Llama parity and conversion")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from free_transformer_jax.convert import ConversionError, from_hf_llama  # noqa: E402
from free_transformer_jax.model.transformer import FreeTransformer  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def make_hf(tmp_path, tie=False, rope=None, layers=4, seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=97, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5,
              tie_word_embeddings=tie, initializer_range=0.1, max_position_embeddings=256,
              rope_theta=500_000.0 if rope else 10_000.0)
    if rope:
        kw["rope_scaling"] = dict(rope, rope_theta=kw["rope_theta"])
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():  # non-trivial norm scales, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return model, str(path)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("tie,rope", [(False, None), (True, LLAMA3_ROPE)])
def test_baseline_matches_hf_llama(tmp_path, tie, rope):
    model, path = make_hf(tmp_path, tie=tie, rope=rope)
    cfg, params = from_hf_llama(path, latent=False)
    assert cfg.tie_embeddings == tie and cfg.n_kv_heads == 2
    assert "readout" not in params if tie else "readout" in params
    tokens = jax.random.randint(jax.random.key(0), (2, 150), 0, cfg.vocab_size)
    ours, _ = jax.jit(FreeTransformer(cfg).apply)({"params": params}, tokens)
    ref = hf_logits(model, tokens)
    assert np.abs(ref).max() > 1.0  # logits of a size where a wrong piece would show
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_free_transformer_from_llama_keeps_the_decoder(tmp_path):
    model, path = make_hf(tmp_path, layers=5)
    cfg, params = from_hf_llama(path, latent=True, latent_bits=6, inject_layer=2, kappa_bits=1.0)
    assert cfg.latent and cfg.latent_bits == 6 and cfg.resolved_inject_layer == 2
    assert params["post_sampler"].shape == (64, 64) and "encoder" in params
    tokens = jax.random.randint(jax.random.key(1), (1, 40), 0, cfg.vocab_size)
    apply = jax.jit(FreeTransformer(cfg).apply)
    zeroed = {**params, "post_sampler": jnp.zeros_like(params["post_sampler"])}
    ours, aux = apply({"params": zeroed}, tokens, rngs={"latent": jax.random.key(0)})
    np.testing.assert_allclose(ours, hf_logits(model, tokens), rtol=1e-4, atol=1e-4)
    assert aux["kl"].shape == (1, 40)
    # the fresh latent parameters do change the output once the table is non-zero
    ours_z, _ = apply({"params": params}, tokens, rngs={"latent": jax.random.key(0)})
    assert float(jnp.max(jnp.abs(ours_z - ours))) > 1e-4


def test_bad_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ConversionError, match="config.json"):
        from_hf_llama(str(tmp_path))
