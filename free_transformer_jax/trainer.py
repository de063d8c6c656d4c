"""The training loop (top level, so dependencies point one way: model <- train/ <- checkpoint,
evaluate <- trainer <- launch): sharded init or resume, the jitted step, metrics one step late, Orbax
checkpoints with the data-iterator state, TensorBoard events and a console progress line."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from free_transformer_jax import checkpoint as ckpt_lib
from free_transformer_jax import flops as flops_lib
from free_transformer_jax import preemption
from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model.config import ConfigError, ModelConfig
from free_transformer_jax.train.optimizer import learning_rate_schedule, make_optimizer
from free_transformer_jax.train.state import init_state, state_shardings
from free_transformer_jax.train.step import jit_train_step


class TrainingError(RuntimeError):
    pass


def _is_main() -> bool:
    return jax.process_index() == 0


def _print(msg: str):
    if _is_main():
        print(msg, flush=True)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, m, s = seconds // 3600, (seconds // 60) % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricWriter:
    """TensorBoard scalars (process 0 only) via tensorboardX: no TensorFlow needed."""

    def __init__(self, logdir: str):
        self.writer = None
        if _is_main():
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train/"):
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(prefix + k, v, step)

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Builds the ModelConfig and checks the training fields; one-line errors."""
    cfg = ModelConfig.from_dict(config.model)
    t = config.train
    for field in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_ckpts"):
        if int(t[field]) < 1:
            raise ConfigError(f"train.{field}={t[field]}: must be >= 1")
    if config.data.seq_len < 1:
        raise ConfigError(f"data.seq_len={config.data.seq_len}: must be >= 1")
    return cfg


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) to ``config.train.steps``; returns the last step's metrics."""
    from free_transformer_jax import data as data_lib  # the grain pipeline

    cfg = validate_config(config)
    data_lib.check_vocab(config)
    t = config.train
    mesh = shard_lib.make_mesh(config.mesh)
    shard_lib.check_batch(t.batch_size, mesh, t.grad_accum)
    schedule = learning_rate_schedule(config.optim, t.steps)
    tx = make_optimizer(config.optim, t.steps)
    abstract, shardings = state_shardings(cfg, tx, mesh)

    if _is_main() and "://" not in workdir:
        os.makedirs(workdir, exist_ok=True)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_ckpts, async_save=t.async_ckpt)
    data_iter = data_lib.make_iterator(config, config.data.train_split,
                                       batch_size=t.batch_size // jax.process_count(), seed=t.seed)
    latest = ckpt.latest_step()
    if latest is not None:
        state = ckpt.restore_state(abstract, data_iter=data_iter, model=config.model.to_dict())
        _print(f"resumed from {ckpt.directory} at step {int(state.step)}")
    else:
        state, _ = init_state(cfg, tx, mesh, t.seed)
    start = int(state.step)
    if start >= t.steps:
        _print(f"already at step {start} >= train.steps={t.steps}; nothing to do")
        ckpt.close()
        return {}

    config_dict = config.to_dict()
    if _is_main() and "://" not in workdir:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2)
    writer = MetricWriter(workdir)
    tokens_per_step = t.batch_size * config.data.seq_len
    flops_per_token = flops_lib.train_flops_per_token(cfg, config.data.seq_len)["total"]
    peak = flops_lib.peak_flops_per_device()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    _print(f"model: {n_params / 1e6:.2f}M params ({'free transformer' if cfg.latent else 'baseline'}"
           f"), mesh {dict(mesh.shape)}, {jax.device_count()} devices, {jax.process_count()} processes")

    last: dict[str, float] = {}
    window = {"t0": time.perf_counter(), "steps": 0}
    run_t0 = time.perf_counter()

    def handle(step: int, metrics: Any):
        """Host side of step ``step``'s metrics: NaN check, console and TensorBoard."""
        nonlocal last
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
            raise TrainingError(f"non-finite loss or gradient at step {step} (loss={values['loss']}, "
                                f"grad_norm={values['grad_norm']}); lower optim.lr or check the data. "
                                f"Last good checkpoint: step {ckpt.latest_step()}")
        last = values
        if step == start + 1:  # the first step includes compilation: time from here on
            window.update(t0=time.perf_counter(), steps=0)
            if step != t.steps and step % t.log_every:
                return
        else:
            window["steps"] += 1
        if step % t.log_every == 0 or step == t.steps:
            dt = time.perf_counter() - window["t0"]
            tok_s = tokens_per_step * window["steps"] / max(dt, 1e-9)
            values["tokens_per_sec_per_device"] = tok_s / jax.device_count()
            values["mfu"] = flops_lib.mfu(tok_s, flops_per_token, jax.device_count(), peak)
            writer.scalars(step, values)
            eta = (t.steps - step) * dt / max(window["steps"], 1)
            kl = f" kl {values['kl_bits']:.3f} bits/tok" if cfg.latent else ""
            _print(f"step {step}/{t.steps} | loss {values['loss']:.4f} ce {values['ce']:.4f}{kl} | "
                   f"{tok_s:,.0f} tok/s | MFU {100 * values['mfu']:.1f}% | lr {values.get('lr', 0):.2e}"
                   f" | ETA {_fmt_time(eta)}")
            window.update(t0=time.perf_counter(), steps=0)

    def run_eval(step: int, params: Any):
        """Honest likelihoods (evaluate.py) on a fresh pass over the eval split."""
        from free_transformer_jax import evaluate as eval_lib

        batches = data_lib.make_iterator(config, config.eval.split,
                                         batch_size=t.batch_size // jax.process_count(), seed=t.seed)
        metrics = eval_lib.evaluate(cfg, params, batches, jax.random.fold_in(jax.random.key(t.seed), step),
                                    prior_samples=config.eval.prior_samples,
                                    max_batches=config.eval.batches,
                                    put=lambda b: shard_lib.global_batch_from_host(b, mesh))
        writer.scalars(step, {k: v for k, v in metrics.items() if k != "n_tokens"}, prefix="eval/")
        _print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                      if k != "n_tokens"))

    step_fn = None
    pending = None
    preempted = False
    watcher = preemption.PreemptionWatcher(ckpt.reached_preemption)
    try:
        with shard_lib.mesh_context(mesh):
            step_fn = jit_train_step(cfg, tx, mesh, shardings, t.seed, t.grad_accum, schedule)
            for step in range(start, t.steps):
                if t.profile_steps and step == start + 2:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                batch = shard_lib.global_batch_from_host(next(data_iter), mesh)
                state, metrics = step_fn(state, batch)
                if pending is not None:
                    handle(*pending)  # waits for the previous step only: the device stays busy
                pending = (step + 1, metrics)
                if t.profile_steps and step == start + 2 + t.profile_steps:
                    jax.profiler.stop_trace()
                ckpt.poll()  # a failed asynchronous save stops the run now, not at the next save
                preempted = watcher.reached(step + 1)  # every process gets the same answer
                if preempted or (step + 1) % t.ckpt_every == 0 or step + 1 == t.steps:
                    handle(*pending)  # never checkpoint a non-finite state
                    pending = None
                    ckpt.save(step + 1, state, data_iter=data_iter, config=config_dict)
                if preempted:
                    ckpt.wait()  # committed before the line is printed
                    print(f"preempted ({watcher.describe()}): checkpoint saved at step {step + 1} "
                          f"in {ckpt.directory}; rerun the same command to resume", flush=True)
                    break
                if t.eval_every and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps):
                    run_eval(step + 1, state.params)
            if pending is not None:
                handle(*pending)
    finally:
        watcher.uninstall()
        ckpt.close()
        writer.close()
    if preempted:
        return last
    _print(f"done: step {t.steps} in {_fmt_time(time.perf_counter() - run_t0)}; checkpoints in "
           f"{ckpt.directory}")
    return last
