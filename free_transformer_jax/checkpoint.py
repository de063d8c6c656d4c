"""Orbax checkpoints: parameters, optimizer state, the Grain data-iterator state and the config, in
one step directory per save.

Items per step: ``params`` and ``opt`` (step counter + optimizer state) as separate pytrees, so an
evaluation job restores parameters alone onto its own mesh; ``data`` (Grain iterator state, one
file per process); ``config`` (the experiment config as JSON, so eval/sample can rebuild the model
from the workdir alone).

What the wrapper guarantees on top of Orbax (BUILD_NOTES "Preemption and checkpoint guarantees"):
a half-written save is never picked up (Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it
when complete; leftovers are removed at start-up); a step that cannot be read is moved aside to
``<workdir>/corrupt_checkpoints`` and resume falls back to the previous step, with one log line;
parameters that are not finite are never saved; a failed save ends the run with one line; a
checkpoint of another model shape is refused, naming the config field, before anything compiles.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from free_transformer_jax.model.config import ConfigError
from free_transformer_jax.train.state import TrainState


class CheckpointError(RuntimeError):
    pass


class DataStateMismatch(CheckpointError):
    """A checkpoint's data-iterator state that reads but does not fit this run's pipeline: the
    checkpoint is sound (never moved aside); the run's data settings differ from the saved ones."""


class NonFiniteStateError(CheckpointError):
    """The state about to be saved has non-finite (or overflowing) parameters."""


def _grain_save_args():
    """grain's Orbax save argument (the restore reads the JSON itself: ``_read_data_state``)."""
    import grain  # imported lazily: evaluation without a data iterator does not need it

    return grain.checkpoint.CheckpointSave


def first_line(e: BaseException, limit: int = 1000) -> str:
    """The first line of an exception, or of its innermost cause (Orbax wraps TensorStore errors
    in messages that print a whole spec), at most ``limit`` characters."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    for err in reversed(chain):  # the root cause names the file and what is wrong with it
        text = str(err).strip()
        if text:
            line = text.splitlines()[0]
            return line if len(line) <= limit else line[:limit] + "..."
    return type(e).__name__


@jax.jit
def _sum_of_squares(tree: Any) -> jax.Array:
    """sum(x**2) over every leaf in float32: inf or NaN exactly when a leaf is non-finite or the
    parameters overflow (|x| beyond ~1e19), in one on-device reduction."""
    leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sum(jnp.stack(leaves)) if leaves else jnp.zeros((), jnp.float32)


def params_sum_of_squares(params: Any) -> float:
    """Host value of :func:`_sum_of_squares` (read from this process's replica: multi-host safe)."""
    out = _sum_of_squares(params)
    return float(np.asarray(out.addressable_shards[0].data))


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(x.shape)
            for path, x in flat}


def _shape_difference(saved: dict, wanted: dict) -> str:
    """The first parameter whose presence or shape differs, in words."""
    for k in sorted(set(saved) | set(wanted)):
        if k not in wanted:
            return f"the checkpoint has parameter {k} which this config does not build"
        if k not in saved:
            return f"this config builds parameter {k} which the checkpoint lacks"
        if saved[k] != wanted[k]:
            return f"parameter {k} is {saved[k]} in the checkpoint, {wanted[k]} in this config"
    return ""


def shape_fields(model: Mapping[str, Any], saved_model: Mapping[str, Any]) -> list[str]:
    """The ``model.*`` fields that differ between the config and the checkpoint's config AND
    change parameter shapes (each is tried alone on ``jax.eval_shape``: nothing is allocated)."""
    from free_transformer_jax.model.config import ModelConfig
    from free_transformer_jax.train.state import abstract_params

    def shapes(d):
        import flax.linen as nn

        return _flat_shapes(nn.meta.unbox(abstract_params(ModelConfig.from_dict(d))))

    differing = [k for k in sorted(model) if k in saved_model and saved_model[k] != model[k]]
    try:
        base = shapes(dict(model))
    except Exception:  # the config itself is invalid: let the caller's validation say so
        return [f"model.{k}={model[k]!r} (checkpoint: {saved_model[k]!r})" for k in differing]
    named = []
    for k in differing:
        try:
            changed = shapes({**model, k: saved_model[k]}) != base
        except Exception:
            changed = True
        if changed:
            named.append(f"model.{k}={model[k]!r} (checkpoint: {saved_model[k]!r})")
    return named or [f"model.{k}={model[k]!r} (checkpoint: {saved_model[k]!r})" for k in differing]


# Noise that follows a failed save or restore, and what stands for it instead: when one TensorStore
# write or read fails, Orbax closes its event loop while the other reads/writes are still running;
# each of them then reports "Event loop is closed" (or, at exit, "sys.meta_path is None") through
# sys.unraisablehook, Orbax's background threads log the same root cause with a traceback per
# thread, and asyncio logs each abandoned write task ("Task exception was never retrieved") when it
# is garbage-collected. The one-line CheckpointError raised by this module carries that root cause,
# so these are dropped (all of them are shown again with absl verbosity >= 1, e.g. ``-v 1``).
_ABORTED_IO = ("Event loop is closed", "sys.meta_path is None")
_ORBAX_SAVE_THREADS = ("/orbax/checkpoint/_src/futures/", "/orbax/checkpoint/checkpoint_manager.py",
                       "/orbax/checkpoint/_src/checkpointers/async_checkpointer.py")


def _verbose() -> bool:
    return logging.get_verbosity() >= logging.DEBUG


class _DropSaveThreadErrors(py_logging.Filter):
    """Drops Orbax's per-thread error logs of a failed save (reported once, as CheckpointError)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno < py_logging.ERROR or _verbose():
            return True
        path = record.pathname.replace(os.sep, "/")
        return not any(p in path for p in _ORBAX_SAVE_THREADS)


class _DropAbandonedTasks(py_logging.Filter):
    """Drops asyncio's report of a write task abandoned after another write failed."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return _verbose() or "exception was never retrieved" not in str(record.msg)


def _unraisable_hook(previous):
    def hook(unraisable):
        text = f"{type(unraisable.exc_value).__name__}: {unraisable.exc_value}"
        if any(m in text for m in _ABORTED_IO) and not _verbose():
            return
        previous(unraisable)
    hook.ft_quiet = True
    return hook


def quiet_aborted_io() -> None:
    """Installs the filters above (once per process)."""
    if not getattr(sys.unraisablehook, "ft_quiet", False):
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
    for name, kind in (("absl", _DropSaveThreadErrors), ("asyncio", _DropAbandonedTasks)):
        logger = py_logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` with this project's items and guarantees."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, create: bool = True):
        if "://" in workdir:
            self.directory = workdir.rstrip("/") + "/checkpoints"
            self.quarantine = workdir.rstrip("/") + "/corrupt_checkpoints"
        else:  # Orbax wants absolute local paths
            self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
            self.quarantine = os.path.join(os.path.abspath(workdir), "corrupt_checkpoints")
        quiet_aborted_io()
        if create:  # a training run owns the directory; a reader (eval, export) must not delete
            self._remove_unfinished_saves()  # another job's save in progress
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot use {self.directory} for checkpoints: {first_line(e)}; "
                                  "pass a --workdir where directories can be created") from e
        self._in_flight: int | None = None  # step of an asynchronous save not yet known committed

    def _remove_unfinished_saves(self) -> None:
        """Deletes ``<step>.orbax-checkpoint-tmp`` directories left by a save killed half-way (never
        a checkpoint: Orbax renames a step only once complete), on the primary process, before the
        run saves anything. Done here, synchronously and one tree at a time, rather than with
        Orbax's ``cleanup_tmp_directories``, which removes a step's directory and the item
        directories inside it concurrently and then fails on files the other removal took."""
        if jax.process_index() != 0:
            return
        root = epath.Path(self.directory)
        try:
            leftovers = sorted(root.glob("*.orbax-checkpoint-tmp*")) if root.exists() else []
            for path in leftovers:
                path.rmtree(missing_ok=True)
                logging.warning("removed %s: an unfinished save (never a checkpoint)", path)
        except OSError as e:  # unwritable: the first save reports it in one line
            logging.warning("could not remove unfinished saves in %s: %s", root, first_line(e))

    # Queries ----------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """Orbax's preemption sync point (every process agrees; see preemption.py)."""
        return self.manager.reached_preemption(step)

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
        """Saves ``state`` at ``step`` (asynchronously when enabled). Refuses non-finite or
        overflowing parameters (:class:`NonFiniteStateError`, naming the last good step) and
        turns a failed write into a one-line :class:`CheckpointError`."""
        if self._in_flight is not None:
            self.wait()  # Orbax waits for the previous save anyway; a failure names its own step
        sq = params_sum_of_squares(state.params)
        if not np.isfinite(sq):
            last = self.latest_step()
            where = (f"last good checkpoint: step {last} in {self.directory}" if last is not None
                     else "no earlier checkpoint")
            raise NonFiniteStateError(
                f"refusing to save step {step}: the parameters are not finite or overflow "
                f"(sum of squares {sq}); {where}; lower optim.lr or set optim.grad_clip, then "
                "rerun to resume from it")
        items = {"params": ocp.args.StandardSave(state.params),
                 "opt": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state})}
        if data_iter is not None:
            items["data"] = _grain_save_args()(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:
            raise self._save_error(step, e) from e
        if saved:
            self._in_flight = step
        return saved

    def _save_error(self, step: int, e: BaseException) -> CheckpointError:
        last = [s for s in self.all_steps() if s != step]
        where = f"last complete checkpoint: step {max(last)}" if last else "no complete checkpoint"
        return CheckpointError(f"saving step {step} to {self.directory} failed: {first_line(e)}; "
                               f"{where}; free disk space or fix the directory's permissions, "
                               "then rerun to resume")

    def poll(self) -> None:
        """Raises (one line) if an asynchronous save has finished with an error; cheap enough to
        call every step, so a full disk stops the run right after the failed write."""
        if self._in_flight is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the last save is committed; raises a one-line error if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(step if step is not None else -1, e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as e:  # the error was already raised by wait()
                logging.warning("closing the checkpoint manager: %s", first_line(e))

    # Restore ------------------------------------------------------------------------------------------
    def params_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the saved parameters from the step's metadata (no array is read)."""
        path = epath.Path(self.directory) / str(step) / "params"
        meta = ocp.StandardCheckpointHandler().metadata(path)
        return _flat_shapes(getattr(meta, "tree", meta))

    def check_shapes(self, step: int, abstract_params: Any,
                     model: Mapping[str, Any] | None = None) -> None:
        """Refuses a checkpoint whose parameters do not have the shapes ``abstract_params`` has,
        naming the ``model.*`` field(s) that differ (when ``model`` is given) or the parameter."""
        try:
            saved = self.params_shapes(step)
        except Exception:  # unreadable metadata: the restore reports it (and falls back)
            return
        wanted = _flat_shapes(abstract_params)
        if saved == wanted:
            return
        fields: list[str] = []
        if model is not None:
            try:
                saved_model = self.restore_config(step=step).get("model", {})
                fields = shape_fields(dict(model), saved_model)
            except CheckpointError:
                pass
        what = ", ".join(fields) if fields else _shape_difference(saved, wanted)
        raise CheckpointError(f"the checkpoint at step {step} in {self.directory} has another "
                              f"model shape: {what}; use the checkpoint's values or another "
                              "--workdir")

    def restore_state(self, abstract_state: TrainState, *, step: int | None = None,
                      data_iter: Any = None, model: Mapping[str, Any] | None = None) -> TrainState:
        """The full training state (and the data iterator, in place) into ``abstract_state``'s
        shardings. Without ``step``: the latest readable step; the unreadable ones after it are
        moved to ``corrupt_checkpoints/`` with a one-line warning each. When no step reads, nothing
        is moved (a one-line error). A data state that reads but does not fit ``data_iter``
        (another data layout) is a one-line error that moves nothing: the checkpoint is sound,
        the settings are not the run's."""
        explicit = step is not None
        step = self._check_step(step)
        self.check_shapes(step, abstract_state.params, model)  # before anything is read
        failed: list[tuple[int, CheckpointError]] = []  # unreadable steps, latest first
        while True:
            items = {"params": ocp.args.StandardRestore(abstract_state.params),
                     "opt": ocp.args.StandardRestore({"step": abstract_state.step,
                                                      "opt_state": abstract_state.opt_state})}
            try:
                data_state = None if data_iter is None else self._read_data_state(step)
                if data_state is not None:
                    self._set_data_state(step, data_iter, data_state)  # before the large read
                restored = self._restore(step, items)
                break
            except DataStateMismatch:
                raise
            except CheckpointError as e:
                if explicit:
                    raise
                failed.append((step, e))
                earlier = [s for s in self.all_steps() if s < step]
                if not earlier:  # nothing reads: more likely the storage than every step; keep all
                    latest, err = failed[0]
                    raise CheckpointError(
                        f"no checkpoint in {self.directory} could be read ({len(failed)} tried; "
                        f"step {latest}: {first_line(err.__cause__ or err)}); nothing was moved: "
                        "rerun once the storage is reachable, or, if they are damaged, move them "
                        "away or use another --workdir") from err
                step = max(earlier)
        for bad, e in failed:  # below a readable step: moved aside, so the run can save it again
            logging.warning("checkpoint step %d is unreadable (%s); moved it to %s; resuming from "
                            "step %d", bad, first_line(e.__cause__ or e), self._move_aside(bad), step)
        if data_iter is not None and hasattr(data_iter, "start_prefetch"):
            data_iter.start_prefetch()  # as grain's Orbax handler does after set_state
        return TrainState(step=restored["opt"]["step"], params=restored["params"],
                          opt_state=restored["opt"]["opt_state"])

    def _read_data_state(self, step: int) -> dict:
        """This process's data-iterator state at ``step``: its own file (what grain's Orbax
        handler wrote), or the merge of all files when another process count wrote them. Raises
        CheckpointError when the files are missing or do not parse (a damaged step), and
        DataStateMismatch when they cannot be merged for this process count."""
        import json

        from free_transformer_jax.data.pipeline import state_from_other_process_count

        data_dir = epath.Path(self.directory) / str(step) / "data"
        own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        try:
            moved = state_from_other_process_count(data_dir)
            if moved is not None:
                return moved
            return json.loads(own.read_text())
        except ConfigError as e:  # worker-process states written by another process count
            raise DataStateMismatch(f"step {step} in {self.directory}: {first_line(e)}; resume on "
                                    "the process count that wrote it") from e
        except Exception as e:
            raise CheckpointError(f"could not read the data-iterator state of step {step} "
                                  f"({data_dir}): {first_line(e)}") from e

    def _set_data_state(self, step: int, data_iter: Any, state: dict) -> None:
        try:
            data_iter.set_state(state)
        except Exception as e:  # a sound file for another pipeline: refuse, move nothing
            raise DataStateMismatch(
                f"the data-iterator state of step {step} in {self.directory} does not fit this "
                f"run's data pipeline ({first_line(e)}); it was saved with other data settings "
                "(data.num_workers, data.streams, train.batch_size): resume with the run's own "
                "values (its config.json) or use another --workdir") from e

    def _move_aside(self, step: int) -> str:
        """Renames an unreadable step out of the checkpoint directory (never deletes it), so the
        run can save that step again; one process renames, all wait."""
        dest = epath.Path(self.quarantine) / str(step)
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            n = 1
            while dest.exists():
                dest = epath.Path(self.quarantine) / f"{step}.{n}"
                n += 1
            (epath.Path(self.directory) / str(step)).rename(dest)
        ocp.multihost.sync_global_processes(f"ft_checkpoint_move_aside_{step}")
        self.manager.reload()
        return str(dest)

    def restore_params(self, abstract_params: Any, *, step: int | None = None) -> Any:
        """Parameters only (no optimizer state), into ``abstract_params``'s shardings: any mesh."""
        step = self._check_step(step)
        self.check_shapes(step, abstract_params)
        return self._restore(step, {"params": ocp.args.StandardRestore(abstract_params)})["params"]

    def restore_config(self, *, step: int | None = None) -> dict:
        step = self._check_step(step)
        return self._restore(step, {"config": ocp.args.JsonRestore()})["config"]

    def _restore(self, step: int, items: dict) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # TensorStore and Orbax raise many types; one line each
            raise CheckpointError(f"could not restore step {step} from {self.directory} "
                                  f"(items {sorted(items)}): {first_line(e)}") from e

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
