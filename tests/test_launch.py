"""The launch scripts end to end in subprocesses: train (and resume), sample, eval, compile."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=32", "--config.model.n_layers=3", "--config.model.inject_layer=1",
        "--config.model.n_heads=2", "--config.model.n_kv_heads=1", "--config.model.ffn_dim=64",
        "--config.model.latent_bits=4", "--config.train.batch_size=8", "--config.train.log_every=2",
        "--config.train.ckpt_every=2", "--config.optim.warmup_steps=1", "--config.data.prefetch=0"]


def run(script, *args, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("launch") / "run")
    r = run("train.py", "--config=configs/demo.py", f"--workdir={wd}", "--config.train.steps=4", *TINY,
            devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 4/4" in r.stdout and "resumed" not in r.stdout
    assert "Saving checkpoint" not in r.stderr  # Orbax's INFO chatter needs -v=1
    return wd


def test_train_writes_events_and_checkpoints_then_resumes(workdir):
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["d_model"] == 32
    r = run("train.py", "--config=configs/demo.py", f"--workdir={workdir}", "--config.train.steps=6",
            *TINY, "-v=1", "--jax_log_compiles", devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    # absl's -v and JAX's own flags reach the libraries
    assert "Saving checkpoint at step 6" in r.stderr
    assert "Compiling jit(train_step)" in r.stderr
    assert "step 6/6" in r.stdout and "step 2/" not in r.stdout
    assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_misspelt_config_field_is_an_error(tmp_path):
    r = run("train.py", "--config=configs/demo.py", f"--workdir={tmp_path}", "--config.model.kapa_bits=1")
    assert r.returncode != 0 and "kapa_bits" in r.stderr


def test_sample_and_eval_from_the_checkpoint(workdir, tmp_path):
    out = str(tmp_path / "samples.jsonl")
    r = run("sample.py", f"--workdir={workdir}", "--prompt=K>", "--prompt=B>", "--num_samples=3",
            "--z=shared", "--max_new_tokens=10", f"--output={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in open(out)]
    assert len(records) == 6 and {r["prompt"] for r in records} == {"K>", "B>"}
    for p in (0, 1):
        group = [r for r in records if r["prompt_index"] == p]
        assert all(r["codes"] == group[0]["codes"] for r in group)  # shared Z within a prompt
        assert all(len(r["text"]) == 10 for r in group)
    events = len(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
    task = tmp_path / "task.jsonl"
    task.write_text(open(os.path.join(ROOT, "data", "tasks", "synthetic_choice.jsonl")).readline())
    r = run("eval.py", f"--workdir={workdir}", "--batches=1", "--prior_samples=1",
            f"--choice_task={task}", "--z_samples=1", devices=4)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(os.path.join(workdir, "eval_step6.json")))
    # parameters restored FSDP-sharded over the 4 devices by default; the choice task scored there
    assert res["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert res["choice_task"]["n_examples"] == 1 and res["choice_task"]["chance"] == 0.25
    assert res["elbo"] == pytest.approx(res["ce_posterior"] + res["kl_nats"], rel=1e-12)
    assert res["model"] == "free_transformer" and np.isfinite(res["ce_prior"])
    assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == events + 1  # eval/


def test_compile_reports_memory_and_refuses_what_does_not_fit():
    args = ["--config=configs/demo.py", "--cpu_devices=8", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2"]
    r = run("compile.py", *args, "--hbm_gib=0.001")
    assert "memory/dev" in r.stdout and "'fsdp': 2" in r.stdout and "flops/step" in r.stdout
    assert r.returncode == 1 and "error: needs" in r.stderr and "--hbm_gib=0.001" in r.stderr
