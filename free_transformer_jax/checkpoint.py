"""Orbax checkpoints: parameters, optimizer state, the Grain data-iterator state and the config, in
one step directory per save.

Items per step: ``params`` and ``opt`` (step counter + optimizer state) as separate pytrees, so an
evaluation job restores parameters alone onto its own mesh; ``data`` (Grain iterator state, one
file per process); ``config`` (the experiment config as JSON, so eval/sample can rebuild the model
from the workdir alone). Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-save never leaves a half-written checkpoint as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from free_transformer_jax.train.state import TrainState


class CheckpointError(RuntimeError):
    pass


def _grain_args():
    import grain  # imported lazily: evaluation without a data iterator does not need it

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` with this project's items."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, create: bool = True):
        if "://" in workdir:
            self.directory = workdir.rstrip("/") + "/checkpoints"
        else:  # Orbax wants absolute local paths
            self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # Queries ----------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def _check_step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}; train first or pass the "
                                  "--workdir of a training run")
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: "
                                  f"{self.all_steps()}")
        return step

    # Save ---------------------------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, *, data_iter: Any = None,
             config: dict | None = None, force: bool = True) -> bool:
        items = {"params": ocp.args.StandardSave(state.params),
                 "opt": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state})}
        if data_iter is not None:
            items["data"] = _grain_args()[0](data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    # Restore ------------------------------------------------------------------------------------------
    def restore_state(self, abstract_state: TrainState, *, step: int | None = None,
                      data_iter: Any = None) -> TrainState:
        """The full training state (and the data iterator, in place) into ``abstract_state``'s
        shardings."""
        step = self._check_step(step)
        items = {"params": ocp.args.StandardRestore(abstract_state.params),
                 "opt": ocp.args.StandardRestore({"step": abstract_state.step,
                                                  "opt_state": abstract_state.opt_state})}
        moved = None  # the data state, when the checkpoint was written by another process count
        if data_iter is not None:
            from free_transformer_jax.data.pipeline import state_from_other_process_count

            moved = state_from_other_process_count(os.path.join(self.directory, str(step), "data"))
            if moved is None:
                items["data"] = _grain_args()[1](data_iter)
        restored = self._restore(step, items)
        if moved is not None:
            data_iter.set_state(moved)
            if hasattr(data_iter, "start_prefetch"):  # as grain's handler does after set_state
                data_iter.start_prefetch()
        return TrainState(step=restored["opt"]["step"], params=restored["params"],
                          opt_state=restored["opt"]["opt_state"])

    def restore_params(self, abstract_params: Any, *, step: int | None = None) -> Any:
        """Parameters only (no optimizer state), into ``abstract_params``'s shardings: any mesh."""
        step = self._check_step(step)
        return self._restore(step, {"params": ocp.args.StandardRestore(abstract_params)})["params"]

    def restore_config(self, *, step: int | None = None) -> dict:
        step = self._check_step(step)
        return self._restore(step, {"config": ocp.args.JsonRestore()})["config"]

    def _restore(self, step: int, items: dict) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"could not restore step {step} from {self.directory} "
                                  f"(items {sorted(items)}): {first}") from e

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()



def load_model(workdir: str, *, step: int | None = None, mesh: Any = None,
               model_overrides: dict | None = None):
    """(config, ModelConfig, params, step) from a training workdir, parameters only (no optimizer
    state), laid out for ``mesh`` (default: all local devices, data-parallel, so parameters are
    replicated): the evaluating machine's device count need not match the training one's."""
    import ml_collections

    from free_transformer_jax import sharding as shard_lib
    from free_transformer_jax.model.config import ModelConfig
    from free_transformer_jax.train.state import abstract_params

    ck = Checkpointer(workdir, async_save=False, create=False)
    try:
        step = ck._check_step(step)
        config = ml_collections.ConfigDict(ck.restore_config(step=step))
        cfg = ModelConfig.from_dict({**config.model.to_dict(), **(model_overrides or {})})
        mesh = mesh or shard_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        boxed = abstract_params(cfg)
        shardings = shard_lib.param_shardings(boxed, mesh)
        import flax.linen as nn

        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nn.meta.unbox(boxed), shardings)
        params = ck.restore_params(target, step=step)
    finally:
        ck.close()
    return config, cfg, params, step
