"""Shared tiny configurations for the tests."""

import functools

import flax.linen as nn
import jax

from free_transformer_jax.model.config import ModelConfig
from free_transformer_jax.model.transformer import init_params

TINY = dict(vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48,
            latent_bits=4, init_std=0.2)


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg, key):
    return nn.meta.unbox(init_params(cfg, key))


def tiny_params(cfg: ModelConfig, seed: int = 0):
    return _init(cfg, jax.random.key(seed))
