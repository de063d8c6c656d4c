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


def tiny_train_config(steps: int = 6, **model):
    """The demo config shrunk for tests: synthetic task, 2+1 layers, 8 sequences per step."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
    spec = importlib.util.spec_from_file_location("demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.update(dict(d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=64, latent_bits=4,
                        inject_layer=1, **model))
    c.train.update(dict(steps=steps, batch_size=8, log_every=2, ckpt_every=3, async_ckpt=False))
    c.optim.warmup_steps = 2
    c.data.synthetic_size = 4096
    c.data.prefetch = 0
    return c


def load_script(path: str, name: str):
    """A script (launch/, bench/) as a module, its absl flags unregistered again: flags are
    process-global, and another test file on the same worker may load a script defining the same
    names (--config)."""
    import importlib.util

    from absl import flags

    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for flag in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, flag)
    return module
