"""The console progress reporter: which steps it reports, and tokens/s, MFU and ETA from a fake
clock, for log_every=1 and larger."""

import math

import pytest

from free_transformer_jax.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _progress(clock, log_every, total=10, latent=True):
    return Progress(total_steps=total, log_every=log_every, tokens_per_step=1000,
                    flops_per_token=6.0, n_devices=2, peak_flops_per_device=1e4, latent=latent,
                    clock=clock)


def _values(step):
    return {"loss": 3.0 - 0.1 * step, "ce": 2.5, "kl_bits": 0.5, "lr": 1e-3}


def _run(progress, clock, steps, seconds_per_step, first_step_seconds=30.0, start=0):
    """Steps start+1.. each taking ``seconds_per_step`` (the first includes compilation)."""
    reports = {}
    for step in range(start + 1, start + steps + 1):
        clock.now += first_step_seconds if step == start + 1 else seconds_per_step
        out = progress.update(step, _values(step))
        if out is not None:
            reports[step] = out
    return reports


def test_log_every_one_excludes_compilation_and_measures_every_step():
    clock = FakeClock()
    p = _progress(clock, log_every=1)
    reports = _run(p, clock, steps=10, seconds_per_step=0.5)
    assert sorted(reports) == list(range(1, 11))
    values, line = reports[1]
    assert "tokens_per_sec" not in values and "tok/s ? (compiling)" in line and "ETA ?" in line
    for step in range(2, 11):
        values, line = reports[step]
        assert values["tokens_per_sec"] == pytest.approx(2000.0)  # 1000 tokens / 0.5 s
        assert values["tokens_per_sec_per_device"] == pytest.approx(1000.0)
        assert values["mfu"] == pytest.approx(2000.0 * 6.0 / (2 * 1e4))
        assert "2,000 tok/s" in line and "MFU 60.0%" in line
    assert "ETA 0m04s" in reports[2][1]  # 8 steps left at 0.5 s
    assert reports[10][1].startswith("step 10/10 | loss 2.0000 ce 2.5000 kl 0.500 bits/tok | ")
    assert "lr 1.00e-03" in reports[10][1] and "ETA 0m00s" in reports[10][1]


@pytest.mark.parametrize("log_every", [3, 4])
def test_window_covers_the_steps_since_the_previous_report(log_every):
    clock = FakeClock()
    p = _progress(clock, log_every=log_every, total=13)
    reports = _run(p, clock, steps=13, seconds_per_step=2.0)
    expected = [s for s in range(1, 14) if s % log_every == 0] + [13]
    assert sorted(reports) == sorted(set(expected))
    for step in reports:
        assert reports[step][0]["tokens_per_sec"] == pytest.approx(500.0)
        assert reports[step][0]["steps_per_sec"] == pytest.approx(0.5)
    first = min(reports)
    assert f"ETA {format_duration(2.0 * (13 - first))}" in reports[first][1]


def test_resumed_run_starts_the_clock_at_its_first_step_and_pauses_are_excluded():
    clock = FakeClock()
    p = _progress(clock, log_every=2, total=20)
    reports = _run(p, clock, steps=4, seconds_per_step=1.0, start=10)  # steps 11..14
    assert sorted(reports) == [12, 14]
    assert reports[12][0]["tokens_per_sec"] == pytest.approx(1000.0)  # 11 is the compiling one
    clock.now += 50.0  # a checkpoint or an evaluation after step 14
    p.restart_clock(14)
    clock.now += 1.0
    assert p.update(15, _values(15)) is None
    clock.now += 1.0
    values, _ = p.update(16, _values(16))
    assert values["tokens_per_sec"] == pytest.approx(1000.0)


def test_baseline_line_has_no_kl_and_unknown_peak_gives_unknown_mfu():
    clock = FakeClock()
    p = Progress(total_steps=4, log_every=1, tokens_per_step=10, flops_per_token=1.0, n_devices=1,
                 peak_flops_per_device=float("nan"), latent=False, clock=clock)
    reports = _run(p, clock, steps=2, seconds_per_step=1.0)
    values, line = reports[2]
    assert "kl" not in line and "MFU ?" in line and math.isnan(values["mfu"])


def test_format_duration():
    assert format_duration(3725) == "1h02m"
    assert format_duration(247) == "4m07s"
    assert format_duration(float("inf")) == "?"
