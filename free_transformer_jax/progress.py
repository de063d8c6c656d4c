"""The console progress line of a training run: step, loss, CE, KL bits/token, tokens/s, MFU,
learning rate and ETA.

Timing: the trainer reports each step's metrics when they reach the host (one step late, so the
device never waits). The first step a run reports includes start-up (the data pipeline's first
batch, the first execution's allocations, and compilation when the step is compiled lazily), so it
only starts the clock: its line shows no throughput. Every later report measures the steps completed since the
previous report (or since :meth:`Progress.restart_clock`, which the trainer calls after an
evaluation or a blocking checkpoint so those pauses do not count as training time), which is right
for any ``log_every``, 1 included.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from free_transformer_jax import flops as flops_lib


def format_duration(seconds: float) -> str:
    """``1h05m`` / ``4m07s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, (seconds // 60) % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Decides which steps are reported and adds throughput figures to their metrics.

    total_steps: the run's last step. log_every: report every N steps (and the last one).
    tokens_per_step: global tokens per optimizer step. flops_per_token: training FLOPs per token
    (``flops.train_flops_per_token``). n_devices, peak_flops_per_device: for MFU (NaN peak: MFU
    unknown). latent: print the KL column. clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, *, total_steps: int, log_every: int, tokens_per_step: int,
                 flops_per_token: float, n_devices: int, peak_flops_per_device: float,
                 latent: bool, clock: Callable[[], float] = time.perf_counter):
        self.total_steps = total_steps
        self.log_every = log_every
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.n_devices = n_devices
        self.peak = peak_flops_per_device
        self.latent = latent
        self.clock = clock
        self._mark: tuple[int, float] | None = None  # (step, time) the current window starts at

    def restart_clock(self, step: int) -> None:
        """Throughput from now on counts steps after ``step`` (whose metrics were reported)."""
        self._mark = (step, self.clock())

    def update(self, step: int, values: dict[str, float]) -> tuple[dict[str, float], str] | None:
        """Step ``step`` finished with scalar metrics ``values``. Returns None when the step is not
        reported, else (values plus ``tokens_per_sec``, ``tokens_per_sec_per_device``, ``mfu``
        and ``steps_per_sec`` when measurable, the console line)."""
        now = self.clock()
        mark = self._mark
        first = mark is None
        if first:  # this step's time includes start-up: start the clock here
            self._mark = (step, now)
        if step % self.log_every and step != self.total_steps:
            return None
        out = dict(values)
        if not first and step > mark[0] and now > mark[1]:
            steps_per_sec = (step - mark[0]) / (now - mark[1])
            tok_s = steps_per_sec * self.tokens_per_step
            out.update(steps_per_sec=steps_per_sec, tokens_per_sec=tok_s,
                       tokens_per_sec_per_device=tok_s / self.n_devices,
                       mfu=flops_lib.mfu(tok_s, self.flops_per_token, self.n_devices, self.peak))
            self._mark = (step, now)
        return out, self.format(step, out)

    def format(self, step: int, v: dict[str, float]) -> str:
        kl = f" kl {v['kl_bits']:.3f} bits/tok" if self.latent and "kl_bits" in v else ""
        line = f"step {step}/{self.total_steps} | loss {v['loss']:.4f} ce {v['ce']:.4f}{kl} | "
        if "tokens_per_sec" in v:
            mfu = v["mfu"]
            mfu_s = f"{100 * mfu:.1f}%" if math.isfinite(mfu) else "?"
            eta = (self.total_steps - step) / v["steps_per_sec"]
            line += f"{v['tokens_per_sec']:,.0f} tok/s | MFU {mfu_s} | "
        else:
            eta = float("nan")
            line += "tok/s ? (compiling) | "
        return line + f"lr {v.get('lr', 0.0):.2e} | ETA {format_duration(eta)}"
