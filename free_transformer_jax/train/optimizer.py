"""AdamW with linear warm-up + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import optax

from free_transformer_jax.model.config import ConfigError

# Parameters that are not decayed: norm scales, the encoder's zeta and its position gain.
NO_DECAY_NAMES = ("scale", "zeta", "pos_gain")


SCHEDULES = ("cosine", "constant")


def validate_optim(optim: Mapping[str, Any]) -> None:
    """One-line ConfigError for a value that would train silently wrong (a negative learning rate
    ascends the loss) or crash later."""
    def fail(field: str, msg: str):
        raise ConfigError(f"optim.{field}={optim[field]!r}: {msg}")

    def number(field: str) -> float:
        try:
            v = float(optim[field])
        except (TypeError, ValueError):
            fail(field, "must be a number")
        if not math.isfinite(v):
            fail(field, "must be finite")
        return v

    if number("lr") <= 0:
        fail("lr", "must be > 0 (the peak learning rate)")
    warmup = number("warmup_steps")
    if warmup < 0 or warmup != int(warmup):
        fail("warmup_steps", "must be an integer >= 0")
    if optim["schedule"] not in SCHEDULES:
        fail("schedule", f"must be one of {SCHEDULES}")
    if not 0 <= number("min_lr_ratio") <= 1:
        fail("min_lr_ratio", "must be in [0, 1] (final lr = lr * min_lr_ratio)")
    for field in ("b1", "b2"):
        if not 0 <= number(field) < 1:
            fail(field, "must be in [0, 1) (Adam moment decay)")
    if number("eps") <= 0:
        fail("eps", "must be > 0")
    if number("weight_decay") < 0:
        fail("weight_decay", "must be >= 0")
    if number("grad_clip") < 0:
        fail("grad_clip", "must be >= 0 (0 disables clipping)")


def learning_rate_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    validate_optim(optim)
    warmup = int(optim["warmup_steps"])
    peak = float(optim["lr"])
    if optim["schedule"] == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])
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
