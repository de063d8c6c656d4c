"""AdamW with linear warm-up + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

# Parameters that are not decayed: norm scales, the encoder's zeta and its position gain.
NO_DECAY_NAMES = ("scale", "zeta", "pos_gain")


def learning_rate_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    warmup = int(optim["warmup_steps"])
    peak = float(optim["lr"])
    if optim["schedule"] == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])
    if optim["schedule"] != "cosine":
        raise ValueError(f"optim.schedule={optim['schedule']!r}: expected 'cosine' or 'constant'")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * float(optim["min_lr_ratio"]))


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: every weight matrix/table, not norms, zeta or gains."""
    def keep(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return not any(n in NO_DECAY_NAMES for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim: Mapping[str, Any], total_steps: int,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """The optimizer of ``optim``; ``schedule`` (default: :func:`learning_rate_schedule`) is passed
    by the program builder so the optimizer and the logged ``lr`` share one schedule object."""
    schedule = learning_rate_schedule(optim, total_steps) if schedule is None else schedule
    parts = []
    if float(optim["grad_clip"]) > 0:
        parts.append(optax.clip_by_global_norm(float(optim["grad_clip"])))
    parts.append(optax.adamw(schedule, b1=float(optim["b1"]), b2=float(optim["b2"]),
                             eps=float(optim["eps"]), weight_decay=float(optim["weight_decay"]),
                             mask=decay_mask))
    return optax.chain(*parts)
