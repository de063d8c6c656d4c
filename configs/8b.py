"""The paper's 8B shape (SPEC section 6). Values the paper does not give are marked [choice]."""

from free_transformer_jax.configlib import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 131_072  # 2**17 (paper)
    m.d_model = 4096
    m.n_layers = 32
    m.n_heads = 32
    m.n_kv_heads = 8
    m.head_dim = 128
    m.ffn_dim = 14_336  # [choice] not given; Llama-3-8B
    m.rope_theta = 500_000.0  # [choice] Llama-3
    m.norm_eps = 1e-5  # [choice] Llama-3
    m.tie_embeddings = False  # [choice] not given; Llama-3 unties
    m.latent_bits = 16  # paper
    m.inject_layer = 16  # paper: after block 16
    m.kappa_bits = 0.5  # paper's 1T-token run: 1/2 bit
    m.dtype = "bfloat16"
    return c
