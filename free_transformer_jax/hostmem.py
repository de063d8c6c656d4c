"""Host memory settings for training on a CPU (BUILD_NOTES "The decoder at its floor on a CPU").

XLA:CPU takes a step's temporaries as one block (1.46 GB for the baseline at the CPU benchmark
shape) when the step starts and frees it when it ends. By default JAX runs the step on one of its
own threads, whose glibc malloc arena can only serve a block that size with a fresh ``mmap``: every
step faults the whole block in again, 4 KiB at a time (about 370,000 page faults and 0.7 s of
kernel time per 4.3 s step there). ``tuned`` runs the step on the calling thread instead
(``jax_cpu_enable_async_dispatch=False``), whose main arena is told to take large blocks from the
heap and to keep the heap's top (``mallopt``: ``M_MMAP_MAX=0``, ``M_TRIM_THRESHOLD=-1``), so the
next step reuses the block already mapped. Peak memory is unchanged (measured); the process keeps
its peak heap mapped until it exits, and Python no longer dispatches step N+1 while step N runs,
which costs nothing when a step takes seconds.

:func:`configure` must run before JAX starts its CPU backend (the dispatch setting is read then);
the launchers that train call it first thing. ``auto`` tunes only where JAX computes on the CPU:
on accelerator hosts the large buffers live in device memory and nothing is changed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys
from typing import Mapping

MODES = ("auto", "tuned", "system")
# mallopt(3) parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")
_DONE: dict[str, str] = {}


def runs_on_cpu(env: Mapping[str, str] = os.environ) -> bool:
    """Whether JAX will compute on the CPU: ``JAX_PLATFORMS`` names cpu first, or it is unset and
    no accelerator plugin (libtpu, the CUDA or ROCm plugins) is installed. Starts no backend."""
    wanted = env.get("JAX_PLATFORMS", "").strip().lower()
    if wanted:
        return wanted.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def _glibc_linux() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # private: a JAX without this function is taken as "started"

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def configure(mode: str = "auto") -> str:
    """Applies ``mode`` to this process and returns one line saying what is in effect. Changes
    nothing (and says why) for ``system``, off Linux/glibc, or once JAX's backend has started.
    Only the first call acts; later calls return its line."""
    if mode not in MODES:
        raise ValueError(f"--host_malloc={mode!r}: expected one of {', '.join(MODES)}")
    if "line" in _DONE:
        return _DONE["line"]
    if mode == "auto" and not runs_on_cpu():
        line = "host memory: as it is (an accelerator computes; --host_malloc=tuned to force)"
    elif mode == "system":
        line = "host memory: as it is (--host_malloc=system)"
    elif not _glibc_linux():
        line = "host memory: as it is (the tuning needs Linux with glibc)"
    elif _backend_started():
        line = "host memory: as it is (JAX's backend had already started)"
    else:
        import jax

        libc = ctypes.CDLL(None)
        if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, -1) != 1:
            line = "host memory: as it is (mallopt refused a setting)"
        else:
            jax.config.update("jax_cpu_enable_async_dispatch", False)
            line = ("host memory: tuned for CPU steps (synchronous dispatch, large blocks reused "
                    "from the heap; --host_malloc=system to turn off)")
    _DONE["line"] = line
    return line


def release_free_memory() -> None:
    """Hands the heap's free pages back to the kernel (glibc's ``malloc_trim``; nothing elsewhere).
    Called once the step is compiled and the state exists: what the compiler and the state's
    initialisation freed is then not kept mapped under the step's temporaries, which the tuned
    setting (no trimming) would otherwise do, and glibc's defaults do as well for memory in the
    middle of the heap."""
    if _glibc_linux():
        ctypes.CDLL(None).malloc_trim(0)


def define_flag():
    """``--host_malloc`` of the launchers that train or benchmark."""
    from absl import flags

    return flags.DEFINE_enum(
        "host_malloc", "auto", list(MODES),
        "tuned: run CPU steps on the calling thread with malloc keeping large blocks mapped, so "
        "XLA:CPU's per-step temporaries are not faulted in again every step (7-9% faster steps "
        "at the CPU bench shape, same peak memory); system: JAX's and glibc's defaults; auto: "
        "tuned when JAX computes on the CPU.")
