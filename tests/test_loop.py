"""The training loop: checkpoints, exact resume (model AND data), NaN stop, config errors."""

import json
import os

import jax
import numpy as np
import pytest

from free_transformer_jax.checkpoint import Checkpointer, load_model
from free_transformer_jax.model.config import ConfigError
from free_transformer_jax.trainer import TrainingError, train
from helpers import tiny_train_config


def _data_state(workdir, step):
    d = os.path.join(workdir, "checkpoints", str(step), "data")
    files = sorted(f for f in os.listdir(d) if f.startswith("process_"))
    with open(os.path.join(d, files[0])) as f:
        return json.load(f)


def test_resume_sees_exactly_the_batches_of_an_uninterrupted_run(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    m_straight = train(tiny_train_config(steps=6), straight)
    train(tiny_train_config(steps=3), resumed)
    assert Checkpointer(resumed).latest_step() == 3
    m_resumed = train(tiny_train_config(steps=6), resumed)
    # the same batches and the same Z draws => the same metrics and bit-identical parameters
    assert m_resumed["loss"] == m_straight["loss"]
    _, _, p1, _ = load_model(straight)
    _, _, p2, _ = load_model(resumed)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    assert _data_state(straight, 6) == _data_state(resumed, 6)
    assert _data_state(resumed, 3) != _data_state(resumed, 6)
    # already done: a third call does nothing
    assert train(tiny_train_config(steps=6), resumed) == {}


def test_eval_during_training(tmp_path, capsys):
    c = tiny_train_config(steps=4)
    c.train.eval_every = 2
    c.eval.batches = 1
    c.eval.prior_samples = 1
    train(c, str(tmp_path / "ev"))
    out = capsys.readouterr().out
    assert "eval at step 2: ce_posterior" in out and "eval at step 4:" in out and "elbo" in out


def test_nan_stops_with_a_clear_message(tmp_path):
    c = tiny_train_config(steps=4)
    c.optim.lr = 1e30  # blows up within a step or two
    c.optim.grad_clip = 0.0
    with pytest.raises(TrainingError, match="non-finite loss"):
        train(c, str(tmp_path / "nan"))
    # nothing non-finite was saved as a checkpoint
    ck = Checkpointer(str(tmp_path / "nan"))
    for step in ck.all_steps():
        _, _, params, _ = load_model(str(tmp_path / "nan"), step=step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_vocab_mismatch_refuses_to_start(tmp_path):
    c = tiny_train_config(steps=2)
    c.model.vocab_size = 30
    with pytest.raises(ConfigError, match="model.vocab_size=30"):
        train(c, str(tmp_path / "bad"))


def test_relative_workdir_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = Checkpointer("rel/run")  # Orbax refuses relative paths: the wrapper resolves them
    assert ck.directory == os.path.join(str(tmp_path), "rel", "run", "checkpoints")
    ck.close()
