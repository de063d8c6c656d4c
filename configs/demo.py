"""CPU demo (the quick start): a 4-layer Free Transformer on the paper's synthetic task, a few
minutes on a laptop, no downloads."""

from free_transformer_jax.configlib import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 29  # the synthetic task's alphabet: A-Z _ ! >
    m.d_model = 128
    m.n_layers = 4
    m.n_heads = 4
    m.n_kv_heads = 2
    m.ffn_dim = 384
    m.latent_bits = 8
    m.kappa_bits = 1.0
    m.inject_layer = 2
    c.data.source = "synthetic"
    c.data.seq_len = 65  # 66-character sequences: 65 inputs, 65 targets
    c.data.packing = "none"
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.train.steps = 300
    c.train.batch_size = 32
    c.train.log_every = 25
    c.train.ckpt_every = 150
    c.mesh.data = -1
    return c
