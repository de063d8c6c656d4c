"""Every config file loads, and a 2-layer version of it builds and runs one train step on its own
mesh layout (8 simulated devices)."""

import glob
import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model.config import ModelConfig
from free_transformer_jax.train.optimizer import make_optimizer
from free_transformer_jax.train.state import init_state
from free_transformer_jax.train.step import jit_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_there_are_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"8b.py", "1p5b.py", "synthetic.py", "demo.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_and_trains_one_step(path):
    c = load(path)
    full = ModelConfig.from_dict(c.model)  # the real shape validates
    assert set(c) >= {"model", "data", "optim", "train", "mesh", "eval"}
    # 2 layers, small width; keep the config's structure: GQA ratio, tying, latent, dtype, remat
    ratio = full.n_heads // full.n_kv_heads
    small = full.replace(n_layers=2, inject_layer=1, d_model=64, n_heads=2 * ratio, n_kv_heads=2,
                         head_dim=16, ffn_dim=96, vocab_size=min(full.vocab_size, 320),
                         latent_bits=min(full.latent_bits, 6))
    b, t = 8, 16
    tx = make_optimizer(c.optim, c.train.steps)
    mesh = shard_lib.make_mesh(c.mesh)
    assert math.prod(mesh.shape.values()) == jax.device_count()
    state, shardings = init_state(small, tx, mesh, seed=0)
    tokens = np.random.default_rng(0).integers(0, small.vocab_size, (b, t + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, t), np.int32),
             "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
             "loss_mask": np.ones((b, t), np.int32)}
    with shard_lib.mesh_context(mesh):
        step = jit_train_step(small, tx, mesh, shardings, seed=0, grad_accum=1)
        state, metrics = step(state, shard_lib.global_batch_from_host(batch, mesh))
    assert int(state.step) == 1
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert abs(float(metrics["ce"]) - np.log(small.vocab_size)) < 1.0  # a fresh model is near uniform
