"""Multi-process start-up: find out how this process was launched and connect it to the others.

Where the three numbers jax.distributed.initialize() needs (coordinator address, process count,
this process's id) come from, first match wins:

1. explicit: the ``--coordinator_address``, ``--num_processes``, ``--process_id`` flags of the
   launchers (:func:`define_flags`), else the environment variables ``FTJ_COORDINATOR_ADDRESS``,
   ``FTJ_NUM_PROCESSES``, ``FTJ_PROCESS_ID`` (``JAX_COORDINATOR_ADDRESS`` is read as well, since
   JAX reads it itself). A value missing here is taken from the scheduler below when there is one
   (e.g. Open MPI 5 gives the rank but no coordinator: pass only ``--coordinator_address``);
2. SLURM (``SLURM_NTASKS`` > 1, processes started by ``srun``): JAX's own SLURM detection
   (coordinator = first node of ``SLURM_STEP_NODELIST``, port from the job id);
3. Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1): JAX's own detection, which needs ``mpirun`` of Open
   MPI 4 (``OMPI_MCA_orte_hnp_uri``); otherwise give the coordinator explicitly;
4. Cloud TPU (TPU chips on this VM): JAX's own detection (the TPU metadata / GKE variables).

Anything else is one process. Partial or contradictory settings are one-line
:class:`DistributedError` messages naming the variable or flag to fix. See the README's "On a pod"
and BUILD_NOTES "Multi-host".
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from absl import flags, logging

ENV_COORDINATOR = "FTJ_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FTJ_NUM_PROCESSES"
ENV_PROCESS_ID = "FTJ_PROCESS_ID"
MODES = ("auto", "on", "off")


class DistributedError(ValueError):
    """A multi-process setting that cannot work; the message names the flag/variable to fix."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started. ``None`` fields are left to JAX's cluster detection."""

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def describe(self) -> str:
        def show(v):
            return "auto-detected by JAX" if v is None else v

        return (f"{self.source}: coordinator {show(self.coordinator_address)}, "
                f"processes {show(self.num_processes)}, process id {show(self.process_id)}")


def define_flags() -> None:
    """Defines --distributed, --coordinator_address, --num_processes, --process_id (absl flags)."""
    flags.DEFINE_enum("distributed", "auto", list(MODES),
                      "Connect processes with jax.distributed.initialize(): auto = when flags, "
                      f"{ENV_COORDINATOR}/..., SLURM, Open MPI or Cloud TPU say there are several; "
                      "on = always (JAX detects the rest); off = never.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                        f"(default: ${ENV_COORDINATOR}, else the scheduler's).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (default: "
                         f"${ENV_NUM_PROCESSES}, else the scheduler's).")
    flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) (default: "
                         f"${ENV_PROCESS_ID}, else the scheduler's).")


def _int(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r}: must be an integer") from None


def _tpu_chips() -> int:
    """TPU chips on this machine (0 without libtpu or off a TPU VM)."""
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0] or 0)
    except Exception:  # a private helper: any failure means "no TPU detected"
        return 0


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, env: Mapping[str, str] | None = None,
           tpu_chips: int | None = None) -> Launch | None:
    """How this process was launched (see the module docstring), or None for a single process.

    Arguments are the flag values (None = not given); ``env`` defaults to ``os.environ`` and
    ``tpu_chips`` to what the machine reports (both injectable for tests).
    """
    env = os.environ if env is None else env
    coord = coordinator_address or env.get(ENV_COORDINATOR) or env.get("JAX_COORDINATOR_ADDRESS") or None
    n = num_processes if num_processes is not None else _int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)

    slurm_n = _int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1
    ompi_n = _int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1
    if slurm_n > 1:
        scheduler, sched_n, sched_id = "SLURM", slurm_n, _int(env.get("SLURM_PROCID"), "SLURM_PROCID")
        # JAX's SLURM detection derives the coordinator from these (srun sets them all)
        sched_coord = all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_LOCALID"))
        coord_hint = ("SLURM_STEP_NODELIST is unset: start every process with srun (not from the "
                      "batch script itself)")
    elif ompi_n > 1:
        scheduler, sched_n = "Open MPI", ompi_n
        sched_id = _int(env.get("OMPI_COMM_WORLD_RANK"), "OMPI_COMM_WORLD_RANK")
        sched_coord = "OMPI_MCA_orte_hnp_uri" in env  # Open MPI 4's mpirun; Open MPI 5 lacks it
        coord_hint = ("Open MPI gives no coordinator address here (OMPI_MCA_orte_hnp_uri unset, "
                      f"e.g. Open MPI 5): pass --coordinator_address=HOST0:PORT or set {ENV_COORDINATOR}")
    else:
        scheduler, sched_n, sched_id, sched_coord, coord_hint = None, None, None, False, ""

    explicit = (coord, n, pid) != (None, None, None)
    if explicit:
        source = "flags/environment" + (f" + {scheduler}" if scheduler else "")
        if n is None:
            n = sched_n
        if pid is None:
            pid = sched_id
        missing = [name for name, v in (("--num_processes", n), ("--process_id", pid)) if v is None]
        if missing:
            raise DistributedError(
                f"multi-process settings are partial: {' and '.join(missing)} not given (flags or "
                f"{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); give coordinator address, process count and "
                "process id together")
        if scheduler and n != sched_n:
            raise DistributedError(f"--num_processes={n} contradicts {scheduler}'s {sched_n} processes; "
                                   "drop the flag or fix the launch")
        if n < 1 or not 0 <= pid < n:
            raise DistributedError(f"--process_id={pid} must be in [0, --num_processes={n})")
        if coord is None and not (scheduler and sched_coord):
            if n == 1:
                return None
            raise DistributedError(
                f"--num_processes={n} given without a coordinator: pass --coordinator_address="
                f"HOST0:PORT (process 0's host and a free port) or set {ENV_COORDINATOR}"
                + (f"; {coord_hint}" if scheduler else ""))
        if n == 1:
            return None
        return Launch(source, coord, n, pid)
    if scheduler:
        if not sched_coord:
            raise DistributedError(f"{scheduler} reports {sched_n} processes but {coord_hint}")
        if sched_id is None or not 0 <= sched_id < sched_n:
            raise DistributedError(f"{scheduler} reports {sched_n} processes but no valid rank of this "
                                   "process (SLURM_PROCID / OMPI_COMM_WORLD_RANK)")
        return Launch(scheduler, None, sched_n, sched_id)
    if (_tpu_chips() if tpu_chips is None else tpu_chips) > 0:
        return Launch("Cloud TPU")
    return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> Launch | None:
    """Connects this process to the others when :func:`detect` says there are several (``mode``
    'on': always, leaving unknowns to JAX; 'off': never). Must run before anything touches a
    device. Logs what it detected; returns it (None = one process)."""
    if mode not in MODES:
        raise DistributedError(f"--distributed={mode!r}: must be one of {MODES}")
    if mode == "off":
        logging.debug("distributed: off (--distributed=off); one process")
        return None
    launch = detect(coordinator_address, num_processes, process_id)
    if launch is None and mode == "on":
        launch = Launch("JAX auto-detection (--distributed=on)")
    if launch is None:
        logging.debug("distributed: one process (no multi-process flags, %s, SLURM, Open MPI or "
                     "Cloud TPU detected)", ENV_COORDINATOR)
        return None
    logging.info("distributed: %s", launch.describe())
    import jax

    try:
        jax.distributed.initialize(coordinator_address=launch.coordinator_address,
                                   num_processes=launch.num_processes, process_id=launch.process_id)
    except (ValueError, RuntimeError, TypeError) as e:  # JAX's messages can be long: keep line one
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "; on a single-host TPU VM pass --distributed=off" if launch.source == "Cloud TPU" else ""
        raise DistributedError(f"jax.distributed.initialize failed ({launch.describe()}): "
                               f"{first[:300]}{hint}") from None
    logging.info("distributed: connected as process %d of %d (%d local devices, %d in all)",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return launch


def initialize_from_flags() -> Launch | None:
    """:func:`initialize` with the values of the flags from :func:`define_flags`."""
    f = flags.FLAGS
    return initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id)
