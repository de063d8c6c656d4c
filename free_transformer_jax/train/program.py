"""One builder for the training program: from an experiment config and a mesh, everything a run
needs (model config, optimizer and learning-rate schedule, abstract state and its shardings, batch
shardings, the jitted step).

``trainer.train()``, ``launch/compile.py`` and ``bench/step_time.py`` all build through
:func:`build_program`, so the program compile.py measures (memory, FLOPs) is the one training runs;
``tests/test_program.py`` checks that both lower to identical HLO.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model.config import ConfigError, ModelConfig, resolve_attention_impl
from free_transformer_jax.train.optimizer import learning_rate_schedule, make_optimizer
from free_transformer_jax.train.state import TrainState, init_state, state_shardings
from free_transformer_jax.train.step import BATCH_KEYS, jit_train_step

# train.* fields that count something and must be at least 1
_POSITIVE_TRAIN_FIELDS = ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_ckpts")


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Builds the ModelConfig and checks the training fields; raises a one-line ConfigError."""
    cfg = ModelConfig.from_dict(config.model)
    t = config.train
    for field in _POSITIVE_TRAIN_FIELDS:
        if int(t[field]) < 1:
            raise ConfigError(f"train.{field}={t[field]}: must be >= 1")
    if config.data.seq_len < 1:
        raise ConfigError(f"data.seq_len={config.data.seq_len}: must be >= 1")
    return cfg


@dataclasses.dataclass(frozen=True)
class Program:
    """The training program of one config on one mesh. Build it with :func:`build_program`."""

    config: ml_collections.ConfigDict  # the experiment config
    model: ModelConfig
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: Callable[[jax.Array], jax.Array]  # learning rate as a function of the step
    abstract_state: TrainState  # ShapeDtypeStructs carrying shardings: the Orbax restore target
    state_shardings: TrainState
    batch_shardings: dict[str, NamedSharding]
    step: Callable  # jax.jit(train_step): in/out shardings fixed, the state donated

    @property
    def global_batch_shape(self) -> tuple[int, int]:
        return (int(self.config.train.batch_size), int(self.config.data.seq_len))

    @property
    def tokens_per_step(self) -> int:
        b, t = self.global_batch_shape
        return b * t

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the step takes: every field int32 (B, T), sharded over the batch axes
        (the layout of ``sharding.global_batch_from_host`` applied to the data pipeline's rows)."""
        return {k: jax.ShapeDtypeStruct(self.global_batch_shape, jnp.int32, sharding=s)
                for k, s in self.batch_shardings.items()}

    def init_state(self, seed: int | None = None, params: Any = None) -> TrainState:
        """A fresh state born in its sharded layout (default seed: ``train.seed``); ``params``
        (e.g. converted from a Hugging Face checkpoint) replaces the random initialisation."""
        seed = int(self.config.train.seed) if seed is None else seed
        state, _ = init_state(self.model, self.tx, self.mesh, seed, params=params,
                              shardings=self.state_shardings)
        return state

    def lower(self) -> jax.stages.Lowered:
        """The step lowered for the abstract state and batch, without running anything: what
        ``launch/compile.py`` compiles for a target topology."""
        with shard_lib.mesh_context(self.mesh):
            return self.step.lower(self.abstract_state, self.abstract_batch())


def build_program(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Program:
    """The training program for ``config`` on ``mesh`` (default: ``sharding.make_mesh(config.mesh)``
    over every device). Raises ConfigError or sharding.MeshError (one line) on a bad config or a
    batch that does not divide over the mesh."""
    cfg = validate_config(config)
    t = config.train
    mesh = shard_lib.make_mesh(config.mesh) if mesh is None else mesh
    shard_lib.check_batch(int(t.batch_size), mesh, int(t.grad_accum))
    # the attention kernel for the mesh's platform and the data's rows (one line, a ConfigError
    # when an explicit kernel cannot run them); model/kernels.py re-checks at trace time
    cfg, attention = resolve_attention_impl(cfg, mesh.devices.flat[0].platform,
                                            seq_len=int(config.data.seq_len),
                                            packed=config.data.packing != "none")
    logging.info("%s", attention)
    schedule = learning_rate_schedule(config.optim, int(t.steps))
    tx = make_optimizer(config.optim, int(t.steps), schedule=schedule)
    abstract, shardings = state_shardings(cfg, tx, mesh)
    batch_shardings = {k: shard_lib.batch_sharding(mesh) for k in BATCH_KEYS}
    step = jit_train_step(cfg, tx, mesh, shardings, int(t.seed), int(t.grad_accum), schedule,
                          batch_shardings=batch_shardings)
    return Program(config=config, model=cfg, mesh=mesh, tx=tx, schedule=schedule,
                   abstract_state=abstract, state_shardings=shardings,
                   batch_shardings=batch_shardings, step=step)


def lower_for_target(config: ml_collections.ConfigDict, mesh: Mesh | None = None
                     ) -> tuple[Program, jax.stages.Lowered]:
    """(program, lowered step) for ``mesh`` (e.g. a TPU topology's devices): compile.py's path."""
    program = build_program(config, mesh)
    return program, program.lower()
