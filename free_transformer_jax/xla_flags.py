"""XLA flags the project sets by default, before jax creates its backends (importing the package
applies them; a flag already named in ``XLA_FLAGS`` is left as the user set it)."""

from __future__ import annotations

import os
import re
from typing import MutableMapping

DEFAULTS: dict[str, str] = {
    # XLA:CPU's concurrency-optimized scheduler issues independent ops as early as it can so the
    # runtime may overlap them; it then allocates, at the start of the step, buffers that are
    # only used late (the zeros a table gradient is scattered into, the upper layers' stacked
    # residual buffers), and they stay live through the whole forward pass. Off: peak RSS -0.17 GB
    # (baseline) and -0.38 GB (Free Transformer) at configs/bench_cpu.py at the same step time
    # (BUILD_NOTES "The decoder at its floor on a CPU"). A CPU-only option: GPU and TPU ignore it.
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
}


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> str:
    """Appends ``--name=value`` to ``XLA_FLAGS`` for each default the variable does not name yet;
    returns the new value. Has no effect on a backend jax has already created."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    for name, value in DEFAULTS.items():
        if not re.search(rf"--{re.escape(name)}(=|\s|$)", flags):
            flags = f"{flags} --{name}={value}".strip()
    environ["XLA_FLAGS"] = flags
    return flags
