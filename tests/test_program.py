"""One program builder: what launch/compile.py lowers is exactly what train() runs."""

import jax
import pytest

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax import trainer
from free_transformer_jax.model.config import ConfigError
from free_transformer_jax.train.program import Program, build_program, lower_for_target
from helpers import tiny_train_config


def _struct(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _config():
    c = tiny_train_config(steps=1)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    c.train.grad_accum = 2
    return c


def test_compile_path_lowers_the_hlo_train_runs(tmp_path, monkeypatch):
    lowered_by_train = []
    real_lower = Program.lower

    def spy_lower(program):  # records what train() compiles (and then runs: a compiled step
        lowered = real_lower(program)  # rejects a state or batch of another shape or sharding)
        lowered_by_train.append((program, lowered.as_text()))
        return lowered

    monkeypatch.setattr(Program, "lower", spy_lower)
    metrics = trainer.train(_config(), str(tmp_path / "run"))
    monkeypatch.undo()
    assert len(lowered_by_train) == 1 and "lr" in metrics  # the schedule is part of the program
    trained_program, trained = lowered_by_train[0]

    compiled_program, lowered = lower_for_target(_config())  # launch/compile.py --cpu_devices
    assert compiled_program.step is not trained_program.step  # built afresh, not shared
    assert lowered.as_text() == trained
    assert "lr" in jax.eval_shape(compiled_program.step, compiled_program.abstract_state,
                                  compiled_program.abstract_batch())[1]


def test_program_state_is_born_sharded_and_matches_its_abstract_state():
    program = build_program(_config())
    state = program.init_state()
    q = state.params["lower"]["layers"]["attn"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert jax.tree.map(_struct, state) == program.abstract_state


def test_build_program_rejects_bad_configs_in_one_line():
    c = _config()
    c.train.batch_size = 6  # micro-batch 3 over data*fsdp = 4 devices
    with pytest.raises(shard_lib.MeshError, match="train.batch_size=6"):
        build_program(c)
    c = _config()
    c.train.log_every = 0
    with pytest.raises(ConfigError, match=r"train.log_every=0: must be >= 1"):
        build_program(c)


def test_topology_names_and_a_missing_libtpu_is_one_line():
    from free_transformer_jax import topology

    assert topology.topology_name("v5p-128") == ("v5p:4x4x4", 95)  # 128 cores = 64 chips
    assert topology.topology_name("v4-64") == ("v4:2x4x4", 32)
    assert topology.topology_name("v5e-256") == ("v5e:16x16", 16)
    assert topology.topology_name("v5p-8") == ("v5p:2x2x1", 95)  # the smallest v5p slice
    assert topology.topology_name("v5p-32") == ("v5p:2x2x4", 95)
    assert topology.topology_name("v5p:2x2x2")[0] == "v5p:2x2x2"
    with pytest.raises(topology.TopologyError, match="expected e.g. v5p-128"):
        topology.topology_name("tpu-big")
    try:
        import libtpu  # noqa: F401
    except ImportError:  # the usual CPU machine: compile.py's error is one line naming the fix
        with pytest.raises(topology.TopologyError, match=r'pip install "jax\[tpu\]"'):
            topology.topology_mesh({"data": -1, "fsdp": 1, "tensor": 1}, "v5p-8")
