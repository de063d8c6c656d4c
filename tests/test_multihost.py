"""Several processes: how they start (distributed.detect), the data order that does not depend on
the process count, and a real two-process run (2 processes x 4 CPU devices, gloo collectives) that
trains, checkpoints, resumes and evaluates like one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from free_transformer_jax import distributed
from free_transformer_jax.configlib import base_config
from free_transformer_jax.data import pipeline, synthetic
from free_transformer_jax.model.config import ConfigError
from helpers import tiny_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DistributedError = distributed.DistributedError


# How processes start ------------------------------------------------------------------------------

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[003-004]", "SLURM_NTASKS": "8",
         "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
OMPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}


def detect(env, tpu_chips=0, **flag_values):
    return distributed.detect(env=env, tpu_chips=tpu_chips, **flag_values)


def test_detect_explicit_flags_and_variables():
    assert detect({}) is None  # nothing set: one process
    got = detect({}, coordinator_address="h0:1234", num_processes=4, process_id=3)
    assert (got.coordinator_address, got.num_processes, got.process_id) == ("h0:1234", 4, 3)
    env = {"FTJ_COORDINATOR_ADDRESS": "h0:99", "FTJ_NUM_PROCESSES": "2", "FTJ_PROCESS_ID": "1"}
    got = detect(env)
    assert (got.coordinator_address, got.num_processes, got.process_id) == ("h0:99", 2, 1)
    assert detect(env, process_id=0).process_id == 0  # a flag wins over its variable
    assert detect({"FTJ_COORDINATOR_ADDRESS": "h0:99", "FTJ_NUM_PROCESSES": "1",
                   "FTJ_PROCESS_ID": "0"}) is None  # one process: nothing to connect


@pytest.mark.parametrize("env,flag_values,message", [
    ({"FTJ_COORDINATOR_ADDRESS": "h0:1"}, {}, "--num_processes and --process_id not given"),
    ({}, {"coordinator_address": "h0:1", "num_processes": 2}, "--process_id not given"),
    ({}, {"num_processes": 2, "process_id": 0}, "without a coordinator: pass --coordinator_address"),
    ({}, {"coordinator_address": "h0:1", "num_processes": 2, "process_id": 2}, r"must be in \[0, "),
    ({"FTJ_NUM_PROCESSES": "two"}, {}, "FTJ_NUM_PROCESSES='two': must be an integer"),
    ({**SLURM, "SLURM_STEP_NODELIST": None}, {}, "start every process with srun"),
    ({**SLURM}, {"coordinator_address": "h0:1", "num_processes": 4}, "contradicts SLURM's 8"),
    (OMPI, {}, "Open MPI gives no coordinator address .* --coordinator_address"),
])
def test_detect_partial_settings_are_one_line_errors(env, flag_values, message):
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(DistributedError, match=message) as e:
        detect(env, **flag_values)
    assert "\n" not in str(e.value)


def test_detect_schedulers():
    got = detect(SLURM)  # JAX's SLURM detection finds the coordinator; we check count and rank
    assert (got.source, got.coordinator_address, got.num_processes, got.process_id) == ("SLURM", None, 8, 5)
    got = detect({**OMPI, "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911"})
    assert (got.source, got.coordinator_address, got.num_processes, got.process_id) == ("Open MPI", None, 4, 2)
    got = detect(OMPI, coordinator_address="h0:5")  # Open MPI 5: the coordinator from the flag
    assert (got.coordinator_address, got.num_processes, got.process_id) == ("h0:5", 4, 2)
    assert detect({}, tpu_chips=4).source == "Cloud TPU"  # JAX's TPU detection does the rest
    assert detect({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # a one-task job


def test_launchers_refuse_partial_settings_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "FTJ_COORDINATOR_ADDRESS": "localhost:1"}
    runs = {script: subprocess.Popen([sys.executable, os.path.join(REPO, "launch", script),
                                      f"--workdir={tmp_path}", "--num_processes=2", *args],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
            for script, args in (("train.py", ["--config=configs/demo.py"]), ("eval.py", []),
                                 ("sample.py", ["--prompt=K>"]))}
    for script, p in runs.items():
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 1, (script, stderr[-2000:])
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: multi-process settings are partial: --process_id not given"), last
        assert "Traceback" not in stderr


# Data order: independent of the process count ------------------------------------------------------

def synthetic_config(**data):
    c = base_config()
    c.model.vocab_size = synthetic.VOCAB_SIZE
    c.data.update(dict(source="synthetic", seq_len=150, packing="first_fit", prefetch=0,
                       read_threads=1, read_buffer=16, synthetic_size=4096, synthetic_eval_size=21))
    c.data.update(data)
    return c


def process_iterators(config, split, global_batch, processes, seed=3):
    return [pipeline.make_iterator(config, split, batch_size=global_batch // processes, seed=seed,
                                   shard_index=i, shard_count=processes) for i in range(processes)]


def global_batches(iterators, steps=None, pad_id=synthetic.UNDERSCORE):
    """The global batches: each step, the processes' rows in process order (None = to the end of
    a finite pass; a process that has run out gives padding, as make_iterator does across JAX
    processes, until all have)."""
    out, done = [], set()
    while steps is None or len(out) < steps:
        parts = []
        for i, it in enumerate(iterators):
            try:
                parts.append(None if i in done else next(it))
            except StopIteration:
                done.add(i)
                parts.append(None)
        if len(done) == len(iterators):
            break
        shape = next(p for p in parts if p is not None)["inputs"].shape
        pad = pipeline._finalize({k: np.zeros(shape, np.int32) for k in pipeline.FIELDS}, pad_id)
        parts = [p or pad for p in parts]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in pipeline.FIELDS})
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in pipeline.FIELDS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def documents(batch):
    """The synthetic records (65 input tokens) packed whole into a batch (concat also has pieces)."""
    docs = set()
    for r in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            if (seg == s).sum() == synthetic.SEQ_TOKENS - 1:
                docs.add(tuple(batch["inputs"][r][seg == s]))
    return docs


@pytest.mark.parametrize("packing,seq_len", [("first_fit", 150), ("concat", 150), ("none", 65)])
def test_global_batch_is_the_same_for_any_process_count(packing, seq_len):
    c = synthetic_config(packing=packing, seq_len=seq_len)
    one = global_batches(process_iterators(c, "train", 8, 1), 12)
    for processes in (2, 4):
        its = process_iterators(c, "train", 8, processes)
        many = global_batches(its, 12)
        assert_same(many, one)
        # each process reads its own records: no document is seen by two processes
        seen = [set().union(*(documents(next(it)) for _ in range(6))) for it in its]
        assert sum(map(len, seen)) >= 6 * 8
        assert all(not seen[i] & seen[j] for i in range(processes) for j in range(i))
    # a finite pass too, to its end (processes whose streams run out first pad their rows)
    one_eval = global_batches(process_iterators(c, "eval", 8, 1))
    assert sum(int(b["loss_mask"].sum()) for b in one_eval) == 21 * 65  # every eval target once
    for processes in (2, 4):
        assert_same(global_batches(process_iterators(c, "eval", 8, processes)), one_eval)
    # the comparison can fail: another seed gives other batches
    other = global_batches(process_iterators(c, "train", 8, 2, seed=4), 12)
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(other, one))


def test_iterator_state_moves_to_another_process_count():
    c = synthetic_config()
    two = process_iterators(c, "train", 8, 2)
    global_batches(two, 5)
    states = [json.loads(json.dumps(it.get_state())) for it in two]  # as the checkpoint stores them
    expected = global_batches(two, 6)
    merged = pipeline.merge_process_states(states)
    for processes in (1, 2, 4):
        its = process_iterators(c, "train", 8, processes)
        for it in its:
            it.set_state(merged)
        assert_same(global_batches(its, 6), expected)
    one = process_iterators(c, "train", 8, 1)[0]
    with pytest.raises(ConfigError, match=r"no document stream\(s\) \[4, 5, 6, 7\]"):
        one.set_state(states[0])  # process 0's own state lacks process 1's streams


def test_stream_layout_errors():
    c = synthetic_config(streams=3)
    with pytest.raises(ConfigError, match="data.streams=3 must divide the global batch size 8"):
        pipeline.make_iterator(c, "train", batch_size=8, seed=0, shard_index=0, shard_count=1)
    c = synthetic_config(streams=2)
    with pytest.raises(ConfigError, match="data.streams=2 is not a multiple of the 4 processes"):
        pipeline.make_iterator(c, "train", batch_size=2, seed=0, shard_index=0, shard_count=4)
    # fewer streams than rows: each stream fills consecutive rows, still process-count free
    c = synthetic_config(streams=4)
    one = global_batches(process_iterators(c, "train", 8, 1), 4)
    assert_same(global_batches(process_iterators(c, "train", 8, 4), 4), one)


# Two real processes ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_resume_and_evaluate_like_one(tmp_path):
    workdir = str(tmp_path / "run")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets 4 devices
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    worker = os.path.join(REPO, "tests", "multihost_worker.py")
    common = [sys.executable, worker, f"--workdir={workdir}"]
    t0 = time.perf_counter()
    procs = [  # process 0 starts from flags, process 1 from the FTJ_* variables
        subprocess.Popen(common + [f"--out={tmp_path}/p0.json", f"--coordinator_address=localhost:{port}",
                                   "--num_processes=2", "--process_id=0"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen(common + [f"--out={tmp_path}/p1.json"],
                         env={**env, "FTJ_COORDINATOR_ADDRESS": f"localhost:{port}",
                              "FTJ_NUM_PROCESSES": "2", "FTJ_PROCESS_ID": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, f"worker failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    p0, p1 = (json.load(open(tmp_path / f"p{i}.json")) for i in range(2))
    print(f"two-process run: {time.perf_counter() - t0:.1f} s; CPU seconds per phase: "
          f"{p0['cpu_seconds']}, {p1['cpu_seconds']}")
    for i, p in enumerate((p0, p1)):
        assert (p["launch"], p["process_index"], p["process_count"]) == ("flags/environment", i, 2)
        assert (p["local_devices"], p["devices"]) == (4, 8)

    from free_transformer_jax import evaluate as eval_lib
    from free_transformer_jax import sharding as shard_lib
    from free_transformer_jax.checkpoint import load_model

    # each process read its own contiguous rows of the global batch one process reads
    config = tiny_train_config()
    config.optim.schedule = "constant"  # as the worker's run (its optimizer state to restore)
    one = process_iterators(config, "train", 8, 1, seed=config.train.seed)[0]
    for step in range(len(p0["rows"])):
        expected = next(one)["inputs"]
        np.testing.assert_array_equal(np.asarray(p0["rows"][step]), expected[:4])
        np.testing.assert_array_equal(np.asarray(p1["rows"][step]), expected[4:])

    # one checkpoint per step, written together (no leftover temporary directories), with each
    # process's data-iterator state naming its own document streams
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["3", "6"]
    for step in ("3", "6"):
        data_dir = os.path.join(ckpt_dir, step, "data")
        files = sorted(f for f in os.listdir(data_dir) if f.startswith("process_"))
        assert files == ["process_0-of-2.json", "process_1-of-2.json"]
        streams = [set(json.load(open(os.path.join(data_dir, f"process_{i}-of-2.json")))["streams"])
                   for i in range(2)]
        assert streams == [{"0", "1", "2", "3"}, {"4", "5", "6", "7"}]
    # both processes restored step 3 and continued to step 6 with the same (global) metrics
    assert "resumed from" in outputs[0][0] and "at step 3" in outputs[0][0]
    for k in ("loss", "ce", "kl_bits", "grad_norm"):
        assert p0["resumed"][k] == p1["resumed"][k] and p0["first"][k] == p1["first"][k], k
    assert p0["resumed"]["loss"] < p0["first"]["loss"]
    assert p0["eval_step"] == p1["eval_step"] == 6

    # resuming the 2-process checkpoint in one process: the data continues at global batch 7
    from free_transformer_jax.checkpoint import Checkpointer
    from free_transformer_jax.train.optimizer import make_optimizer
    from free_transformer_jax.train.state import state_shardings
    from free_transformer_jax.train.program import validate_config

    mesh = shard_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    abstract, _ = state_shardings(validate_config(config), make_optimizer(config.optim, 6), mesh)
    resumed_it = process_iterators(config, "train", 8, 1, seed=config.train.seed)[0]
    ckpt = Checkpointer(workdir, async_save=False, create=False)
    state = ckpt.restore_state(abstract, data_iter=resumed_it)
    ckpt.close()
    assert int(state.step) == 6
    for _ in range(3):  # `one` has given 3 batches: skip to 6
        next(one)
    assert_same([next(resumed_it)], [next(one)])

    # evaluation on 2 x 4 devices = evaluation on 1 x 8 devices, same checkpoint and batches
    ev_config, cfg, params, _ = load_model(workdir, mesh=mesh)

    def evaluate(max_batches):
        batches = pipeline.make_iterator(ev_config, "eval", batch_size=8, seed=0)
        with shard_lib.mesh_context(mesh):
            return eval_lib.evaluate(cfg, params, batches, jax.random.key(0), prior_samples=2,
                                     max_batches=max_batches,
                                     put=lambda b: shard_lib.global_batch_from_host(b, mesh))

    for key, max_batches in (("eval", 2), ("eval_full", None)):
        if key == "eval_full":
            ev_config.data.synthetic_eval_size = 20
        single = evaluate(max_batches)
        for p in (p0, p1):
            assert p[key]["n_tokens"] == single["n_tokens"]
            for k in ("ce_posterior", "kl_nats", "ce_prior", "elbo"):
                assert p[key][k] == pytest.approx(single[k], rel=1e-5, abs=1e-6), (key, k)
    assert single["n_tokens"] == 20 * 65  # the whole pass: no process stopped early
