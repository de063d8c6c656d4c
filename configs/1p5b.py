"""The paper's 1.5B shape (SPEC section 6). Values the paper does not give are marked [choice]."""

from free_transformer_jax.configlib import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 131_072  # 2**17 (paper)
    m.d_model = 1536
    m.n_layers = 28
    m.n_heads = 12
    m.n_kv_heads = 2
    m.head_dim = 128
    m.ffn_dim = 8960  # [choice] not given; Qwen2-1.5B-like
    m.rope_theta = 1_000_000.0  # [choice] not given; Qwen2-like
    m.norm_eps = 1e-6  # [choice]
    m.tie_embeddings = True  # paper
    m.latent_bits = 16  # paper
    m.inject_layer = 14  # paper: after block 14
    m.kappa_bits = 0.5  # [choice] among the paper's 1/4, 1/2, 1, 2
    m.dtype = "bfloat16"
    return c
