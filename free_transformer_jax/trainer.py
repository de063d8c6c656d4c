"""The training loop (top level, so dependencies point one way: model <- train/ <- checkpoint,
evaluate <- trainer <- launch): the program from ``train.program.build_program``, sharded init or
resume, metrics one step late, Orbax checkpoints with the data-iterator state, TensorBoard events
and the console progress line (``progress.Progress``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from free_transformer_jax import checkpoint as ckpt_lib
from free_transformer_jax import configlib
from free_transformer_jax import flops as flops_lib
from free_transformer_jax import fs
from free_transformer_jax import hostmem
from free_transformer_jax import init_from
from free_transformer_jax import preemption
from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.progress import Progress, format_duration
from free_transformer_jax.train.program import Program, build_program
from free_transformer_jax.train.state import TrainState


class TrainingError(RuntimeError):
    pass


def _is_main() -> bool:
    return jax.process_index() == 0


def _print(msg: str):
    """Console output of the run (process 0 only): progress lines and what the run is doing."""
    if _is_main():
        print(msg, flush=True)


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{"model.d_model": 128, ...}``: the hyperparameters as one flat dict."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, d: Any):
        for k, v in d.items():
            if isinstance(v, (dict, ml_collections.ConfigDict)):
                walk(f"{prefix}{k}.", v)
            else:
                flat[prefix + k] = v
    walk("", config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    return flat


# scalars the HParams tab shows next to the hyperparameters
HPARAM_METRICS = ("train/loss", "train/ce", "train/kl_bits")


class MetricWriter:
    """TensorBoard events (process 0 only) via tensorboardX: no TensorFlow needed."""

    def __init__(self, logdir: str):
        self.writer = None
        if _is_main():
            self.writer = fs.summary_writer(logdir)  # local or remote (gs://) logdir

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train/"):
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(prefix + k, v, step)

    def hyperparameters(self, step: int, config: ml_collections.ConfigDict):
        """The flattened config, written once per ``train()`` call at the step it starts from: as
        a TensorBoard HParams session (the HPARAMS tab, comparable across runs) and as a text
        table (the TEXT tab)."""
        if self.writer is None:
            return
        from tensorboardX.summary import hparams as hparams_summaries

        flat = {k: v if isinstance(v, (bool, int, float, str)) else repr(v)
                for k, v in flatten_config(config).items()}
        experiment, session_start, _ = hparams_summaries(flat, {k: 0.0 for k in HPARAM_METRICS})
        file_writer = self.writer._get_file_writer()  # the same event file as the scalars
        file_writer.add_summary(experiment, step)
        file_writer.add_summary(session_start, step)
        rows = "\n".join(f"| {k} | {v!r} |" for k, v in sorted(flat.items()))
        self.writer.add_text("hyperparameters", "| field | value |\n|---|---|\n" + rows, step)

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class ProfileWindow:
    """A profiler trace of ``steps`` training steps starting at step ``first`` (after warm-up);
    :meth:`close` stops a trace still running (the trainer calls it in a ``finally``)."""

    def __init__(self, logdir: str, first: int, steps: int):
        self.logdir, self.first, self.last = logdir, first, first + steps - 1
        self.enabled = steps > 0
        self.active = False

    def before_step(self, step: int):
        if self.enabled and step == self.first:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after_step(self, step: int, outputs: Any):
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)  # the trace covers the steps' device work
            self.close()

    def close(self):
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            logging.info("profiler trace written to %s", self.logdir)


def _make_workdir(workdir: str):
    if _is_main():
        fs.makedirs(workdir, "--workdir")


def _write_config(config: ml_collections.ConfigDict, workdir: str):
    """config.json in the workdir (local or remote), so eval/sample rebuild the model from the
    workdir alone."""
    if _is_main():
        fs.write_json(fs.join(workdir, "config.json"), config.to_dict(), "config.json")


def _restore_or_init(program: Program, ckpt: ckpt_lib.Checkpointer, data_iter: Any,
                     workdir: str) -> TrainState:
    """The latest checkpoint (model, optimizer and data iterator) or a fresh sharded init. Resuming
    with a config that changes a fixed field (``configlib.check_resume``) is refused before any
    restore or compilation."""
    if ckpt.latest_step() is not None:
        configlib.check_resume(workdir, program.config.to_dict())
        state = ckpt.restore_state(program.abstract_state, data_iter=data_iter,
                                   model=program.config.model.to_dict())
        _print(f"resumed from {ckpt.directory} at step {int(state.step)}")
        return state
    params = init_from.initial_params(program.config, program.model, program.mesh,
                                      int(program.config.train.seed))  # None: random init
    return program.init_state(params=params)


def _describe(program: Program) -> str:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(program.abstract_state.params))
    kind = "free transformer" if program.model.latent else "baseline"
    return (f"model: {n_params / 1e6:.2f}M params ({kind}), mesh {dict(program.mesh.shape)}, "
            f"{jax.device_count()} devices, {jax.process_count()} processes")


def _host_metrics(step: int, metrics: Any, ckpt: ckpt_lib.Checkpointer) -> dict[str, float]:
    """Step ``step``'s metrics on the host; a non-finite loss or gradient stops the run."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
        raise TrainingError(f"non-finite loss or gradient at step {step} (loss={values['loss']}, "
                            f"grad_norm={values['grad_norm']}); lower optim.lr or check the data. "
                            f"Last good checkpoint: step {ckpt.latest_step()}")
    return values


def _make_progress(program: Program) -> Progress:
    config = program.config
    return Progress(total_steps=int(config.train.steps), log_every=int(config.train.log_every),
                    tokens_per_step=program.tokens_per_step,
                    flops_per_token=flops_lib.train_flops_per_token(
                        program.model, int(config.data.seq_len))["total"],
                    n_devices=jax.device_count(),
                    peak_flops_per_device=flops_lib.peak_flops_per_device(),
                    latent=program.model.latent)


def _train_batches(config: ml_collections.ConfigDict) -> Any:
    """This process's checkpointable iterator over the training split."""
    from free_transformer_jax import data as data_lib  # the grain pipeline

    return data_lib.make_iterator(config, config.data.train_split,
                                  batch_size=config.train.batch_size // jax.process_count(),
                                  seed=config.train.seed)


def _evaluate(program: Program, step: int, params: Any, writer: MetricWriter):
    """Honest likelihoods (evaluate.py) on a fresh pass over the eval split."""
    from free_transformer_jax import data as data_lib
    from free_transformer_jax import evaluate as eval_lib

    config, t = program.config, program.config.train
    batches = data_lib.make_iterator(config, config.eval.split,
                                     batch_size=t.batch_size // jax.process_count(), seed=t.seed)
    with contextlib.closing(batches):
        metrics = eval_lib.evaluate(
            program.model, params, batches, jax.random.fold_in(jax.random.key(t.seed), step),
            prior_samples=config.eval.prior_samples, max_batches=config.eval.batches,
            put=lambda b: shard_lib.global_batch_from_host(b, program.mesh))
    shown = {k: v for k, v in metrics.items() if k != "n_tokens"}
    writer.scalars(step, shown, prefix="eval/")
    _print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))


def _loop(program: Program, state: TrainState, data_iter: Iterator, ckpt: ckpt_lib.Checkpointer,
          writer: MetricWriter, workdir: str, watcher: preemption.PreemptionWatcher,
          step_fn: Callable) -> tuple[dict[str, float], bool]:
    """Steps from ``state.step`` to ``train.steps``; returns (last metrics, preempted). Metrics
    reach the host one step late (the device stays busy); they are always checked before a
    checkpoint, so a non-finite state is never saved. On SIGTERM/SIGINT (``watcher``) the current
    step finishes, is saved and committed, and the loop stops at a step every process agrees on."""
    config, t = program.config, program.config.train
    start = int(state.step)
    progress = _make_progress(program)
    profile = ProfileWindow(os.path.join(workdir, "profile"), start + 2, int(t.profile_steps))
    last: dict[str, float] = {}
    pending: tuple[int, Any] | None = None

    def flush():
        """Host side of the pending step: NaN check, console and TensorBoard."""
        nonlocal pending, last
        if pending is None:
            return
        step, metrics = pending
        pending = None
        last = _host_metrics(step, metrics, ckpt)
        report = progress.update(step, last)
        if report is not None:
            values, line = report
            writer.scalars(step, values)
            _print(line)

    try:
        with shard_lib.mesh_context(program.mesh):
            for step in range(start, int(t.steps)):
                done = step + 1
                profile.before_step(step)
                batch = shard_lib.global_batch_from_host(next(data_iter), program.mesh)
                state, metrics = step_fn(state, batch)
                flush()  # the previous step's metrics: waits for that step only
                pending = (done, metrics)
                profile.after_step(step, metrics)
                paused = False
                ckpt.poll()  # a failed asynchronous save stops the run now, not at the next save
                preempted = watcher.reached(done)  # every process, every step: the same answer
                if preempted or done % t.ckpt_every == 0 or done == t.steps:
                    flush()  # never checkpoint a non-finite state
                    ckpt.save(done, state, data_iter=data_iter, config=config.to_dict())
                    paused = True
                if preempted:
                    ckpt.wait()  # committed before the line is printed
                    print(f"preempted ({watcher.describe()}): checkpoint saved at step {done} in "
                          f"{ckpt.directory}; rerun the same command to resume", flush=True)
                    return last, True
                if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
                    flush()
                    _evaluate(program, done, state.params, writer)
                    paused = True
                if paused:  # saving/evaluating is not training time
                    progress.restart_clock(done)
            flush()
    finally:
        profile.close()
    return last, False


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) to ``config.train.steps``; returns the last step's metrics."""
    from free_transformer_jax import data as data_lib

    program = build_program(config)
    data_lib.check_vocab(config)
    t = config.train
    run_t0 = time.perf_counter()
    _make_workdir(workdir)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_ckpts, async_save=t.async_ckpt)
    data_iter = writer = None
    watcher = preemption.PreemptionWatcher(ckpt.reached_preemption)
    try:
        data_iter = _train_batches(config)
        state = _restore_or_init(program, ckpt, data_iter, workdir)
        start = int(state.step)
        if start >= t.steps:
            _print(f"already at step {start} >= train.steps={t.steps}; nothing to do")
            return {}
        # compiled before the first step, and the memory the compiler and the initialisation
        # freed handed back, so neither sits under the step's temporaries at the peak
        # (BUILD_NOTES "The decoder at its floor on a CPU", item 7)
        step_fn = program.lower().compile()
        hostmem.release_free_memory()
        _write_config(config, workdir)
        writer = MetricWriter(workdir)
        writer.hyperparameters(start, config)
        _print(_describe(program))
        last, preempted = _loop(program, state, data_iter, ckpt, writer, workdir, watcher,
                                step_fn)
    finally:
        watcher.uninstall()
        if data_iter is not None:
            data_iter.close()  # stops prefetch threads and grain worker processes
        ckpt.close()
        if writer is not None:
            writer.close()
    if preempted:
        return last
    _print(f"done: step {t.steps} in {format_duration(time.perf_counter() - run_t0)}; checkpoints "
           f"in {ckpt.directory}")
    return last
