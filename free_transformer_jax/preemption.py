"""Preemption: SIGTERM or SIGINT stops training at a step every process agrees on, so the trainer
can save a checkpoint there and exit cleanly (see BUILD_NOTES "Preemption and checkpoint
guarantees").

Two ways to agree on the step:

* After ``jax.distributed.initialize`` (multi-process runs), JAX's preemption sync manager owns
  SIGTERM: its notifier tells the coordination service, which picks the step after the largest step
  any process has reached; ``CheckpointManager.reached_preemption(step)`` (Orbax, through
  ``multihost_utils.reached_preemption_sync_point``) is True at that step on every process. The
  watcher leaves SIGTERM to it and forwards SIGINT to it, so Ctrl-C also stops every host at once.
* In a single process without the distributed runtime there is no sync manager; the watcher's own
  signal flag decides (with several processes but the preemption service disabled, the flag is
  OR-ed across processes every step, which costs one tiny collective per step).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import jax
import numpy as np
from absl import logging

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def jax_preemption_sync_available() -> bool:
    """True when ``jax.distributed.initialize`` ran with the preemption service (the default):
    then JAX's notifier handles SIGTERM and the sync manager answers ``reached_preemption``."""
    from jax._src import distributed

    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class PreemptionWatcher:
    """Installed for the duration of the training loop: ``reached(step)`` is called after every
    step (on every process, with the same steps) and says whether to save and stop there.

    A second signal while the first is being handled restores the previous handlers and delivers
    the signal again (Ctrl-C twice = KeyboardInterrupt, as usual): stopping mid-save is safe,
    because a half-written checkpoint is never picked up (Orbax's temporary directory + rename).
    """

    def __init__(self, reached_preemption: Callable[[int], bool] | None = None,
                 signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.received: str | None = None  # the signal this process got, if any
        self._synced = jax_preemption_sync_available()
        self._reached_preemption = reached_preemption
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            logging.warning("preemption: not on the main thread; SIGTERM/SIGINT are not handled")
            return
        for sig in signals:
            if self._synced and sig == signal.SIGTERM:
                continue  # JAX's preemption notifier has its own SIGTERM handler: keep it
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            logging.warning("preemption: second %s; stopping without waiting for the checkpoint",
                            name)
            previous = self._previous.get(signum)
            self.uninstall()
            if callable(previous):  # e.g. Python's SIGINT handler: KeyboardInterrupt, here and now
                previous(signum, frame)
            elif previous != signal.SIG_IGN:  # the default action (SIGINT, SIGTERM: terminate)
                os.kill(os.getpid(), signum)
            return
        self.received = name
        logging.warning("preemption: received %s; finishing this step, then saving a checkpoint",
                        name)
        if self._synced and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # hand it to JAX's notifier: every host stops

    def reached(self, step: int) -> bool:
        """Whether to save at ``step`` and stop; the same answer on every process."""
        if self._synced:
            if self._reached_preemption is not None:
                return bool(self._reached_preemption(step))
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self.received is not None))
            return bool(np.any(flags))
        return self.received is not None

    def describe(self) -> str:
        """Which notice stopped the run, for the exit line."""
        return self.received or "a preemption notice"

    def uninstall(self) -> None:
        """Puts back the handlers that were there before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()
