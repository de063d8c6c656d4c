"""Evaluation and sampling on a sharded mesh: parameters restored straight into FSDP x tensor
shardings give the same metrics and tokens as on one device. (Choice scoring on the default
inference mesh runs in test_launch's eval.py run.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_transformer_jax import data as data_lib
from free_transformer_jax import evaluate as eval_lib
from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.checkpoint import (Checkpointer, inference_mesh_shape, load_model,
                                             params_mesh)
from free_transformer_jax.generate import SamplingConfig, generate
from free_transformer_jax.model.config import ModelConfig
from free_transformer_jax.train.state import TrainState
from helpers import _init, tiny_train_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A step-1 checkpoint of a tiny model (no training: its random weights are enough here)."""
    wd = str(tmp_path_factory.mktemp("sharded") / "run")
    c = tiny_train_config(init_std=0.3)
    c.model.n_kv_heads = 2  # so the KV projections shard over tensor=2 too
    params = _init(ModelConfig.from_dict(c.model), jax.random.key(0))
    # evaluation restores parameters only: a stand-in optimizer state is enough
    state = TrainState(step=jnp.asarray(1, jnp.int32), params=params,
                       opt_state={"count": jnp.zeros((), jnp.int32)})
    ck = Checkpointer(wd, async_save=False)
    ck.save(1, state, config=c.to_dict())
    ck.close()
    return wd


@pytest.fixture(scope="module")
def loaded(workdir):
    one = load_model(workdir, mesh=shard_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                       jax.devices()[:1]))
    eight = load_model(workdir, mesh_overrides={"fsdp": 4, "tensor": 2})
    return one, eight


def test_inference_mesh_shards_parameters_by_default():
    # the demo config's data-parallel mesh becomes FSDP for evaluation; flags override it
    demo = {"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1}
    assert inference_mesh_shape(demo, 8) == {"data": 1, "fsdp": 8, "tensor": 1, "dcn_data": 1}
    assert inference_mesh_shape(demo, 8, {"tensor": 2}) == {"data": 1, "fsdp": 4, "tensor": 2,
                                                            "dcn_data": 1}
    assert inference_mesh_shape(demo, 8, {"data": -1, "fsdp": 1}) == {"data": 8, "fsdp": 1,
                                                                      "tensor": 1, "dcn_data": 1}
    # multi-slice: the slices stay on the data axis
    assert inference_mesh_shape({**demo, "dcn_data": 2}, 8)["data"] == 2
    with pytest.raises(shard_lib.MeshError, match="mesh.fsdp=3|multiply|divide"):
        inference_mesh_shape(demo, 8, {"fsdp": 3})


def test_restored_parameters_are_sharded_not_replicated(workdir, loaded):
    (_, _, p1, _), (_, _, p8, _) = loaded
    mesh = params_mesh(p8)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    d0 = jax.devices()[0]
    total = sum(x.nbytes for x in jax.tree.leaves(p8))
    on_d0 = sum(s.data.nbytes for x in jax.tree.leaves(p8) for s in x.addressable_shards
                if s.device == d0)
    assert on_d0 < 0.3 * total, (on_d0, total)  # replicated would be 1.0
    specs = {jax.tree_util.keystr(k): x.sharding.spec
             for k, x in jax.tree_util.tree_flatten_with_path(p8)[0]}
    assert any("fsdp" in str(s) for s in specs.values()) and any("tensor" in str(s)
                                                                   for s in specs.values())
    # the default mesh (no overrides) on 8 devices is FSDP over all of them
    _, _, pd, _ = load_model(workdir)
    assert dict(params_mesh(pd).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(pd))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(pd)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_metrics_match_one_device(loaded):
    results = []
    for config, cfg, params, _ in loaded:
        batches = data_lib.make_iterator(config, "eval", batch_size=8, seed=0)
        results.append(eval_lib.evaluate(cfg, params, batches, jax.random.key(0), prior_samples=1,
                                         max_batches=1, mesh=params_mesh(params)))
    m1, m8 = results
    for k in ("ce_posterior", "kl_nats", "ce_prior", "elbo"):
        assert m8[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    assert m8["n_tokens"] == m1["n_tokens"] == 8 * 65


def test_generation_matches_one_device(loaded):
    outs = []
    prompts = [[3, 14, 15, 9], [5, 2], [8, 9, 7]]  # 3 rows: padded to the mesh's 4 batch shards
    for _, cfg, params, _ in loaded:
        outs.append(generate(cfg, params, prompts, SamplingConfig(max_new_tokens=4),
                             z_key=jax.random.key(3), token_key=jax.random.key(4),
                             return_logits=True, mesh=params_mesh(params)))
    one, eight = outs
    np.testing.assert_allclose(eight["logits"], one["logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(eight["tokens"], one["tokens"])
    np.testing.assert_array_equal(eight["codes"], one["codes"])
    assert eight["new_tokens"] == one["new_tokens"] and len(eight["new_tokens"]) == 3
