"""The paper's synthetic task (SPEC section 7, paper section 4.1), sized to train on a 2-core CPU
in a few minutes. Used by launch/synthetic_sweep.py for the kappa sweep. The paper does not give
its synthetic model's size or recipe: everything below is a [choice]."""

from free_transformer_jax.configlib import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 29  # A-Z _ ! >
    m.d_model = 128
    m.n_layers = 4
    m.n_heads = 4
    m.n_kv_heads = 4
    m.ffn_dim = 384
    m.inject_layer = 2  # the middle, as in the paper
    m.latent_bits = 12  # [choice] the paper uses 16; 12 keeps the CPU cost of the 2^H table small
    m.kappa_bits = 0.125  # swept by launch/synthetic_sweep.py: 1/64, 1/8, 1, 8
    m.latent_token_chunk = 0
    c.data.source = "synthetic"
    c.data.seq_len = 65
    c.data.packing = "none"
    c.data.prefetch = 0
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.train.steps = 800
    c.train.batch_size = 32
    c.train.log_every = 100
    c.train.ckpt_every = 400
    c.train.async_ckpt = False
    return c
