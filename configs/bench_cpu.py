"""The CPU benchmark shape of ``bench/step_time.py`` (BUILD_NOTES "Attention kernels and
benchmarks"): the shape the public PyTorch Free Transformer (x-transformers) was measured at on
the same machine. Random tokens; the data section only has to be valid."""

from free_transformer_jax.configlib import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 256
    m.d_model = 512
    m.n_layers = 8
    m.n_heads = 8
    m.n_kv_heads = 2
    m.head_dim = 64
    m.ffn_dim = 1408
    m.latent_bits = 16
    m.kappa_bits = 0.5
    m.dtype = "float32"
    m.attention_impl = "auto"
    c.data.seq_len = 512
    c.data.packing = "none"
    c.train.batch_size = 8
    c.train.steps = 1000
    c.optim.warmup_steps = 10
    c.mesh.data = -1
    return c
