"""Preemption and checkpoints that cannot mislead (BUILD_NOTES "Preemption and checkpoint
guarantees"): SIGTERM mid-run, a save killed half-way, a truncated array file, exploding
parameters, a full disk, another model shape.

Every run uses the same tiny 60-step config, so one uninterrupted run (the ``straight`` fixture)
is the reference that each interrupted-then-resumed run must match bit for bit.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from free_transformer_jax.checkpoint import (Checkpointer, CheckpointError, NonFiniteStateError,
                                             load_model)
from free_transformer_jax.model.config import ConfigError
from free_transformer_jax.preemption import PreemptionWatcher
from free_transformer_jax.trainer import train
from helpers import tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CKPT_EVERY = 60, 20


def run_config(**train_fields):
    c = tiny_train_config(steps=STEPS)
    c.train.update({**dict(ckpt_every=CKPT_EVERY, log_every=1, async_ckpt=True), **train_fields})
    return c


CONFIG_FILE = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
from test_checkpoint_safety import run_config

def get_config():
    return run_config()
"""


_CACHE_FLAGS = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for this module's runs, in-process and subprocesses: the
    tiny train step compiles once instead of eight times (two thirds of each run's CPU time). The
    same executable everywhere also keeps the bit-identical comparisons honest."""
    from jax._src import compilation_cache as cc

    flags = dict(_CACHE_FLAGS, jax_compilation_cache_dir=str(tmp_path_factory.mktemp("jax_cache")))
    before = {k: getattr(jax.config, k) for k in flags}
    for k, v in flags.items():
        jax.config.update(k, v)
    cc.reset_cache()
    yield {k.upper(): str(v) for k, v in flags.items()}
    for k, v in before.items():
        jax.config.update(k, v)
    cc.reset_cache()


def _env(cache_env):
    env = dict(os.environ)  # XLA_FLAGS (8 devices) and PYTHONPATH come from conftest / the caller
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                         env.get("PYTHONPATH", "")])
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as conftest sets in this process
    env.update(cache_env)
    return env


def _launch(tmp_path, workdir, cache_env, *, script=None, file_size_limit=None):
    """``launch/train.py`` (or ``script``) on the test config, output line by line."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CONFIG_FILE)
    if script is None:
        cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={cfg}",
               f"--workdir={workdir}"]
    else:
        cmd = [sys.executable, "-c", script, str(cfg), str(workdir)]
    if file_size_limit is not None:
        cmd = [sys.executable, "-c", LIMIT_FILE_SIZE, str(file_size_limit)] + cmd
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(cache_env), cwd=ROOT)


# RLIMIT_FSIZE makes writes past the limit fail with EFBIG, as on a full disk, even for root; the
# ignored SIGXFSZ and the limit both survive the exec into the training process.
LIMIT_FILE_SIZE = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
os.execv(sys.argv[2], sys.argv[2:])
"""


def _final_params(workdir):
    return jax.tree.leaves(load_model(str(workdir), step=STEPS)[2])


def _assert_bit_identical(workdir, reference):
    for a, b in zip(_final_params(workdir), reference, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(workdir, final parameters) of an uninterrupted run."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    train(run_config(), str(workdir))
    return workdir, _final_params(workdir)


# Preemption ------------------------------------------------------------------------------------------
def test_sigterm_saves_the_current_step_exits_0_and_resume_is_bit_identical(tmp_path, straight,
                                                                           compilation_cache):
    workdir = tmp_path / "preempted"
    proc = _launch(tmp_path, workdir, compilation_cache)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err[-3000:]
    lines = [l for l in out.splitlines() if l.startswith("preempted (SIGTERM): checkpoint saved at step")]
    assert len(lines) == 1, out
    step = int(lines[0].split("at step ")[1].split()[0])
    assert 3 <= step < STEPS and "done:" not in out
    assert Checkpointer(str(workdir)).all_steps()[-1] == step  # committed before the exit
    # the same command resumes from that step (model, optimizer AND data order) to the end
    train(run_config(), str(workdir))
    _assert_bit_identical(workdir, straight[1])


def test_sigint_is_a_preemption_notice_and_a_second_one_interrupts():
    # Python's own SIGINT handler underneath, whatever earlier tests in this worker left there
    # (under xdist, something before this file leaves a handler that does not raise)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _sigint_twice()
    finally:
        signal.signal(signal.SIGINT, outer)


def _sigint_twice():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionWatcher() as watcher:
        assert not watcher.reached(1)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the step finishes first
        time.sleep(0.01)
        assert watcher.reached(2) and watcher.describe() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(50):  # short sleeps: the signal is handled between them at the latest
                time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


TWO_PROCESSES = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[3], num_processes=2,
                           process_id=int(sys.argv[4]))
import importlib.util
spec = importlib.util.spec_from_file_location("cfg", sys.argv[1])
cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg)
from free_transformer_jax.trainer import train
train(cfg.get_config(), sys.argv[2])
"""


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, compilation_cache):
    """2 processes x 4 CPU devices: JAX's preemption sync (through Orbax's reached_preemption)
    makes the process that was not signalled stop and save at the same step."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    workdir = tmp_path / "two"
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CONFIG_FILE)
    env = _env(compilation_cache)
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(cfg), str(workdir), port,
                               str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT) for i in range(2)]
    try:
        for line in procs[0].stdout:  # process 0 prints the progress lines
            if line.startswith("step 3/"):
                procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
                break
        outs = [procs[0].stdout.read(), procs[1].stdout.read()]
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], [p.stderr.read()[-2000:] for p in procs]
    steps = []
    for out in outs:
        lines = [l for l in out.splitlines() if l.startswith("preempted (")]
        assert len(lines) == 1, out
        steps.append(int(lines[0].split("at step ")[1].split()[0]))
    assert steps[0] == steps[1] and 3 < steps[0] < STEPS, steps
    assert Checkpointer(str(workdir)).all_steps() == [steps[0]]


# A save killed half-way --------------------------------------------------------------------------------
KILL_MID_SAVE = """
import sys, time
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def blocking_finalize(self):
    # everything of step 40 is written to its temporary directory; hang before the rename
    if self._final_path.name == "40":
        sys.stdout.write("\\nBLOCKED_BEFORE_RENAME\\n")  # own line, even amid progress lines
        sys.stdout.flush()
        time.sleep(600)
    return await finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = blocking_finalize
import importlib.util
spec = importlib.util.spec_from_file_location("cfg", sys.argv[1])
cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg)
from free_transformer_jax.trainer import train
train(cfg.get_config(), sys.argv[2])
"""


def test_a_save_killed_half_way_is_never_picked(tmp_path, straight, compilation_cache):
    workdir = tmp_path / "killed"
    proc = _launch(tmp_path, workdir, compilation_cache, script=KILL_MID_SAVE)
    for line in proc.stdout:
        if "BLOCKED_BEFORE_RENAME" in line:  # printed from Orbax's thread: may share a line
            proc.kill()  # SIGKILL: no handler, no cleanup
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckdir = workdir / "checkpoints"
    tmp = [n for n in os.listdir(ckdir) if n.startswith("40.orbax-checkpoint-tmp")]
    assert len(tmp) == 1 and (ckdir / tmp[0] / "params").is_dir()  # written, not yet renamed
    ck = Checkpointer(str(workdir))
    assert ck.latest_step() == 20  # the complete-looking step 40 is not a checkpoint
    ck.close()
    train(run_config(), str(workdir))
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckdir))  # leftover removed
    _assert_bit_identical(workdir, straight[1])


# A truncated array file --------------------------------------------------------------------------------
def test_a_truncated_latest_checkpoint_is_reported_in_one_line_and_skipped(tmp_path, straight, capfd,
                                                                          caplog):
    workdir = tmp_path / "truncated"
    shutil.copytree(straight[0], workdir)
    # the largest array data file of each OCDBT data directory (the per-process one and the merged
    # one: which of the two the root manifest points to depends on the layout)
    for d in (workdir / "checkpoints" / str(STEPS) / "params").rglob("d"):
        biggest = max(d.iterdir(), key=lambda p: p.stat().st_size)
        os.truncate(biggest, biggest.stat().st_size // 10)
    capfd.readouterr()  # the same command: step 60 is unreadable, so it resumes from step 40
    train(run_config(), str(workdir))
    out, err = capfd.readouterr()
    reports = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(reports) == 1 and f"checkpoint step {STEPS} is unreadable" in reports[0], reports
    assert "\n" not in reports[0] and "Error reading" in reports[0]  # one line with the cause
    assert "resuming from step 40" in reports[0] and "Traceback" not in err
    assert f"resumed from {workdir / 'checkpoints'} at step 40" in out
    assert (workdir / "corrupt_checkpoints" / str(STEPS)).is_dir()  # moved aside, not deleted
    _assert_bit_identical(workdir, straight[1])


def test_when_no_step_reads_nothing_is_moved_and_the_error_is_one_line(tmp_path, straight):
    """Every step unreadable is more likely the storage (an outage, permissions) than every
    checkpoint: moving them all aside would leave a restarted job to start from scratch."""
    workdir = tmp_path / "none_reads"
    shutil.copytree(straight[0], workdir)
    steps = sorted(os.listdir(workdir / "checkpoints"))
    for d in (workdir / "checkpoints").glob("*/params/**/d"):
        for f in d.iterdir():
            os.truncate(f, 0)
    with pytest.raises(CheckpointError, match=rf"no checkpoint in .* could be read \(3 tried; step "
                                              rf"{STEPS}: .*\); nothing was moved") as e:
        train(run_config(), str(workdir))
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(workdir / "checkpoints")) == steps
    assert not (workdir / "corrupt_checkpoints").exists()


# The data-iterator state ------------------------------------------------------------------------------
def _data_file(workdir, step):
    return workdir / "checkpoints" / str(step) / "data" / "process_0-of-1.json"


def test_a_data_state_that_does_not_parse_is_a_damaged_step_and_skipped(tmp_path, straight, caplog):
    workdir = tmp_path / "garbled"
    shutil.copytree(straight[0], workdir)
    _data_file(workdir, STEPS).write_text('{"streams": {"0": ')  # cut short
    train(run_config(), str(workdir))  # resumes from step 40 with step 40's data state
    reports = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(reports) == 1 and f"checkpoint step {STEPS} is unreadable (Expecting value" in \
        reports[0] and "resuming from step 40" in reports[0], reports
    assert (workdir / "corrupt_checkpoints" / str(STEPS) / "data").is_dir()
    _assert_bit_identical(workdir, straight[1])


def test_a_data_state_of_another_pipeline_is_refused_and_moves_nothing(tmp_path, straight):
    """A sound checkpoint whose data state was written by another data layout (here: grain's
    worker-process layout, data.num_workers=1) is a settings problem, not damage: one line,
    every step stays where it is, and the run's own layout resumes from it afterwards."""
    from free_transformer_jax.checkpoint import DataStateMismatch
    from free_transformer_jax.data import pipeline

    workdir = tmp_path / "other_layout"
    shutil.copytree(straight[0], workdir)
    own = _data_file(workdir, STEPS).read_text()
    workers = run_config()
    workers.data.num_workers = 1
    it = pipeline.make_iterator(workers, "train", batch_size=8, seed=0)
    try:
        state = it.get_state()
    finally:
        it.close()
    assert "streams" not in state  # the worker layout differs from the in-process one
    _data_file(workdir, STEPS).write_text(json.dumps(state))
    steps = sorted(os.listdir(workdir / "checkpoints"))
    with pytest.raises(DataStateMismatch, match=r"the data-iterator state of step 60 in .* does not "
                                                r"fit this run's data pipeline .*data\.num_workers") as e:
        train(run_config(), str(workdir))
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(workdir / "checkpoints")) == steps
    assert not (workdir / "corrupt_checkpoints").exists()
    _data_file(workdir, STEPS).write_text(own)  # the run's own state: step 60 resumes as it is
    train(run_config(), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == steps
    _assert_bit_identical(workdir, straight[1])


# Exploding parameters ----------------------------------------------------------------------------------
def test_overflowing_parameters_are_never_saved(tmp_path):
    c = run_config(ckpt_every=1, steps=4)
    c.optim.update(lr=1e30, grad_clip=0.0)  # warm-up: step 1 has lr 0, step 2 blows up
    workdir = str(tmp_path / "explode")
    with pytest.raises(NonFiniteStateError, match=r"refusing to save step 2: .* last good "
                                                  r"checkpoint: step 1 in"):
        train(c, workdir)
    ck = Checkpointer(workdir)
    assert ck.all_steps() == [1]
    ck.close()
    _, _, params, _ = load_model(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# A full disk ------------------------------------------------------------------------------------------
def test_a_failed_save_stops_the_run_at_once_with_one_line(tmp_path, compilation_cache):
    workdir = tmp_path / "full"
    # 40 kB: config.json and the TensorBoard file stay below it, the checkpoint's array files do not
    proc = _launch(tmp_path, workdir, compilation_cache, file_size_limit=40_000)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    # one line on stderr besides absl INFO records (the run's own log, e.g. the attention choice)
    # and this module's compilation cache refusing writes past the limit
    lines = [l for l in err.splitlines() if l.strip() and "persistent compilation cache" not in l
             and l.strip() != "warnings.warn(" and not re.match(r"I\d{4} ", l)]
    assert len(lines) == 1, err[-3000:]
    last = lines[0]
    assert last.startswith(f"error: saving step {CKPT_EVERY} to {workdir / 'checkpoints'} failed"), \
        err[-3000:]
    assert "File too large" in last and "no complete checkpoint" in last
    steps = [int(l.split()[1].split("/")[0]) for l in out.splitlines() if l.startswith("step ")]
    assert max(steps) < 2 * CKPT_EVERY  # stopped right after the failed write, not at the next save


def test_a_checkpoint_directory_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("a regular file, so nothing can be created below it, even by root")
    with pytest.raises(CheckpointError, match=r"cannot use .*/file/run/checkpoints for checkpoints: "
                                              r"\[Errno 20\] Not a directory") as e:
        Checkpointer(str(tmp_path / "file" / "run"))
    assert "\n" not in str(e.value)


# Another model shape ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("d_model", 64), ("latent", False)])
def test_another_model_shape_is_refused_naming_the_field(straight, field, value, monkeypatch,
                                                          tmp_path):
    """Two independent refusals, both before the train step is lowered and compiled: the run's
    config.json (configlib.check_resume) and, without it, the checkpoint's own parameter shapes
    against the config (Checkpointer.check_shapes)."""
    c = run_config()
    c.model[field] = value
    from free_transformer_jax.train.program import Program

    def no_compile(*a, **k):
        raise AssertionError("lowered the train step before refusing the checkpoint")

    monkeypatch.setattr(Program, "lower", no_compile)
    with pytest.raises(ConfigError, match=rf"differs from its config.json in model\.{field}: "):
        train(c, str(straight[0]))
    copy = tmp_path / "copy"
    shutil.copytree(straight[0], copy)
    os.remove(copy / "config.json")  # e.g. a workdir whose config.json was lost
    with pytest.raises(CheckpointError, match=rf"another model shape: model\.{field}={value!r} "
                                              rf"\(checkpoint: .*\)"):
        train(c, str(copy))
