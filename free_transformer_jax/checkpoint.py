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


MESH_FLAG_AXES = ("data", "fsdp", "tensor")


def inference_mesh_shape(mesh_cfg: Any, n_devices: int,
                         overrides: dict[str, int | None] | None = None) -> dict[str, int]:
    """The mesh evaluation and sampling use, as {data, fsdp, tensor, dcn_data} sizes.

    Without ``overrides`` (``None`` values count as absent): the config's ``mesh`` section with
    its data-parallel axis folded into ``fsdp`` (the same batch split, parameters sharded instead
    of replicated: an 8B model does not fit replicated on one chip). With them: the given axes,
    the others ``data=1, fsdp=-1, tensor=1`` (so ``{"tensor": 4}`` is FSDP x 4-way tensor over all
    devices). Multi-slice ``dcn_data`` slices stay on the data axis unless ``data`` is given."""
    from free_transformer_jax import sharding as shard_lib

    given = {k: int(v) for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(MESH_FLAG_AXES))
    if unknown:
        raise shard_lib.MeshError(f"mesh overrides {unknown}: expected axes among {MESH_FLAG_AXES}")
    dcn = int(mesh_cfg.get("dcn_data", 1))
    if given:
        m = {"data": dcn, "fsdp": -1, "tensor": 1, **given}
    else:
        m = {a: int(mesh_cfg.get(a, 1)) for a in MESH_FLAG_AXES}
    try:
        data, fsdp, tensor = shard_lib.resolve_mesh_shape(m, n_devices)
    except shard_lib.MeshError as e:
        raise shard_lib.MeshError(f"{e} (for evaluation/sampling: pass --mesh_data/--mesh_fsdp/"
                                  f"--mesh_tensor that fit {n_devices} devices, -1 for one of them)"
                                  ) from None
    if data % dcn:
        dcn = 1
    if "data" not in given:
        data, fsdp = dcn, data * fsdp // dcn
    return {"data": data, "fsdp": fsdp, "tensor": tensor, "dcn_data": dcn}


def inference_mesh(mesh_cfg: Any, overrides: dict[str, int | None] | None = None,
                   devices: Any = None):
    """:func:`inference_mesh_shape` built on ``devices`` (default: all devices)."""
    from free_transformer_jax import sharding as shard_lib

    devices = list(jax.devices() if devices is None else devices)
    return shard_lib.make_mesh(inference_mesh_shape(mesh_cfg, len(devices), overrides), devices)


def params_mesh(params: Any):
    """The mesh a restored parameter tree lives on."""
    return jax.tree.leaves(params)[0].sharding.mesh


def load_model(workdir: str, *, step: int | None = None, mesh: Any = None,
               mesh_overrides: dict[str, int | None] | None = None,
               model_overrides: dict | None = None):
    """(config, ModelConfig, params, step) from a training workdir, parameters only (no optimizer
    state), restored by Orbax straight into their shardings on ``mesh`` (each device reads its own
    shard; nothing passes through one device). Default mesh: :func:`inference_mesh` of the
    checkpoint config's ``mesh`` section with ``mesh_overrides`` (e.g. ``{"tensor": 2}``), so
    parameters are FSDP/tensor-sharded by the logical rules in ``sharding.py``, never replicated
    unless asked (``{"data": -1, "fsdp": 1}``). ``params_mesh(params)`` returns the mesh used.
    The evaluating machine's device count need not match the training one's."""
    import flax.linen as nn
    import ml_collections

    from free_transformer_jax import sharding as shard_lib
    from free_transformer_jax.model.config import ModelConfig
    from free_transformer_jax.train.state import abstract_params

    if mesh is not None and mesh_overrides:
        raise ValueError("load_model: pass mesh or mesh_overrides, not both")
    ck = Checkpointer(workdir, async_save=False, create=False)
    try:
        step = ck._check_step(step)
        config = ml_collections.ConfigDict(ck.restore_config(step=step))
        cfg = ModelConfig.from_dict({**config.model.to_dict(), **(model_overrides or {})})
        if mesh is None:
            mesh = inference_mesh(config.get("mesh", {}), mesh_overrides)
        boxed = abstract_params(cfg)
        shardings = shard_lib.param_shardings(boxed, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nn.meta.unbox(boxed), shardings)
        params = ck.restore_params(target, step=step)
    finally:
        ck.close()
    return config, cfg, params, step
