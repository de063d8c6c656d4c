"""Sharded training equals single-device training; gradient accumulation equals one big batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.configlib import base_config
from free_transformer_jax.train.optimizer import make_optimizer
from free_transformer_jax.train.state import TrainState, init_state
from free_transformer_jax.train.step import grads_and_metrics, jit_train_step, make_train_step
from helpers import tiny_config, tiny_params

B, T, STEPS = 8, 16, 3


def _batch(cfg, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(k1, (STEPS, B, T + 1), 0, cfg.vocab_size)
    # packed-looking rows: two documents per row in half of them, and some padding
    seg = np.ones((STEPS, B, T), np.int32)
    seg[:, ::2, T // 2:] = 2
    seg[:, 1, -3:] = 0
    pos = np.where(seg == 2, np.arange(T) - T // 2, np.arange(T)).astype(np.int32)
    return [{"inputs": np.asarray(tokens[s, :, :-1]), "targets": np.asarray(tokens[s, :, 1:]),
             "segment_ids": seg[s], "positions": pos[s],
             "loss_mask": (seg[s] > 0).astype(np.int32)} for s in range(STEPS)]


def _train(cfg, mesh_cfg, devices, grad_accum=1):
    optim = base_config().optim
    optim.warmup_steps = 1
    optim.lr = 1e-2
    tx = make_optimizer(optim, 10)
    mesh = shard_lib.make_mesh(mesh_cfg, devices)
    state, shardings = init_state(cfg, tx, mesh, seed=0)
    losses = []
    with shard_lib.mesh_context(mesh):
        step = jit_train_step(cfg, tx, mesh, shardings, seed=0, grad_accum=grad_accum)
        for batch in _batch(cfg):
            state, metrics = step(state, shard_lib.global_batch_from_host(batch, mesh))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config(n_layers=2, inject_layer=1)
    return cfg, _train(cfg, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_training_matches_single_device(reference, mesh):
    cfg, (ref_losses, ref_params, _) = reference
    losses, params, state = _train(cfg, dict(zip(("data", "fsdp", "tensor"), mesh)), jax.devices())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert ref_losses[-1] < ref_losses[0]  # it does train
    if mesh == (1, 4, 2):  # parameters really are sharded, not replicated
        q = state.params["lower"]["layers"]["attn"]["q"]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        assert q.addressable_shards[0].data.shape == (1, 8, 2, 8)


def test_grad_accumulation_equals_full_batch(reference):
    cfg = reference[0]
    params = tiny_params(cfg)
    batch = jax.tree.map(jnp.asarray, _batch(cfg)[0])
    key = jax.random.key(3)
    g1, m1 = jax.jit(lambda p, b: grads_and_metrics(cfg, p, b, key, 1))(params, batch)
    g4, m4 = jax.jit(lambda p, b: grads_and_metrics(cfg, p, b, key, 4))(params, batch)
    for k in ("loss", "ce", "kl_nats", "kl_term", "frac_above_kappa", "n_tokens"):
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(m1["kl_nats"]) > 0


def test_aggregate_kl_ramp_follows_the_step_in_one_pass_and_accumulated():
    cfg = tiny_config(n_layers=2, inject_layer=1, latent_bits=4, aggregate_kl_weight=0.8,
                      aggregate_kl_ramp_steps=100)
    params = tiny_params(cfg)
    batch = jax.tree.map(jnp.asarray, _batch(cfg)[0])
    key = jax.random.key(3)
    f1 = jax.jit(lambda p, b, s: grads_and_metrics(cfg, p, b, key, 1, step=s)[1])
    f4 = jax.jit(lambda p, b, s: grads_and_metrics(cfg, p, b, key, 4, step=s)[1])
    by_step = {s: f1(params, batch, jnp.int32(s)) for s in (0, 25, 100, 400)}
    agg = float(by_step[0]["aggregate_kl_bits"]) * np.log(2.0)  # the same Z at every step: same key
    assert agg > 0
    for s, m in by_step.items():
        base = float(m["ce"]) + float(m["kl_term"])
        np.testing.assert_allclose(float(m["loss"]), base + 0.8 * min(s / 100, 1.0) * agg, rtol=1e-5,
                                   err_msg=f"step {s}")
    # accumulated, each micro-batch's aggregate is its own rows' (a batch-level term), weighted alike
    m4 = f4(params, batch, jnp.int32(25))
    np.testing.assert_allclose(float(m4["loss"]), float(m4["ce"]) + float(m4["kl_term"]) + 0.8 * 0.25
                               * float(m4["aggregate_kl_bits"]) * np.log(2.0), rtol=1e-5)
    with pytest.raises(ValueError, match="needs the optimizer step"):
        grads_and_metrics(cfg, params, batch, key, 1)
    # the train step hands its own step to the loss and logs the weight it used
    tx = optax.sgd(0.0)
    step_fn = jax.jit(make_train_step(cfg, tx, seed=0, grad_accum=1))
    for s in (0, 25, 400):
        state = TrainState(step=jnp.int32(s), params=params, opt_state=tx.init(params))
        new_state, m = step_fn(state, batch)
        assert int(new_state.step) == s + 1
        weight = float(m["aggregate_kl_weight"])
        np.testing.assert_allclose(weight, 0.8 * min(s / 100, 1.0), rtol=1e-6)
        np.testing.assert_allclose(float(m["loss"]), float(m["ce"]) + float(m["kl_term"])
                                   + weight * float(m["aggregate_kl_bits"]) * np.log(2.0),
                                   rtol=1e-5, err_msg=f"step {s}")


def test_mesh_errors_are_one_line():
    with pytest.raises(shard_lib.MeshError, match="multiply"):
        shard_lib.make_mesh(dict(data=3, fsdp=1, tensor=1))
    with pytest.raises(shard_lib.MeshError, match="only one axis"):
        shard_lib.make_mesh(dict(data=-1, fsdp=-1, tensor=1))
    mesh = shard_lib.make_mesh(dict(data=-1, fsdp=2, tensor=1))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(shard_lib.MeshError, match="train.batch_size=12"):
        shard_lib.check_batch(12, mesh)
    with pytest.raises(shard_lib.MeshError, match="grad_accum"):
        shard_lib.check_batch(16, mesh, grad_accum=3)


def test_multi_slice_mesh_keeps_slices_contiguous_on_the_data_axis():
    mesh = shard_lib.make_mesh(dict(data=4, fsdp=2, tensor=1, dcn_data=2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # data rows 0-1 hold "slice" 0 (devices 0-3), rows 2-3 slice 1: only the data axis crosses slices
    assert set(ids[:2].ravel()) == {0, 1, 2, 3} and set(ids[2:].ravel()) == {4, 5, 6, 7}
    with pytest.raises(shard_lib.MeshError, match="dcn_data=3"):
        shard_lib.make_mesh(dict(data=4, fsdp=2, tensor=1, dcn_data=3))


def test_every_logical_name_has_a_rule():
    from free_transformer_jax.train.state import abstract_params
    names = set()
    for leaf in jax.tree.leaves(abstract_params(tiny_config()),
                                is_leaf=lambda x: hasattr(x, "names")):
        names.update(n for n in leaf.names if n)
    rules = dict(shard_lib.LOGICAL_RULES)
    assert names <= set(rules), names - set(rules)
    with pytest.raises(shard_lib.MeshError, match="no rule"):
        shard_lib.mesh_axes_for("embedd")
