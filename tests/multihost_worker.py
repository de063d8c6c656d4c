"""One process of tests/test_multihost.py's two-process run (4 simulated CPU devices each).

Starts the way the launchers do (free_transformer_jax.distributed from flags or FTJ_* variables),
then: records the rows its data iterator gives for the first steps, trains to step 3 (a
checkpoint), resumes to step 6, and evaluates the step-6 checkpoint with eval.batches capped.
Writes what it saw to --out (JSON) for the test to check.
"""

import json
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from free_transformer_jax import distributed  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (shared by the processes).")
_OUT = flags.DEFINE_string("out", None, "JSON file this process writes its observations to.")
distributed.define_flags()

STEPS_FIRST, STEPS_TOTAL, RECORDED = 3, 6, 3


def run_config(steps: int):
    """The tests' tiny config; a constant learning rate after warm-up, so that the run to step 3
    and the resumed run to step 6 compile the same step (one compilation, from the cache)."""
    from helpers import tiny_train_config

    config = tiny_train_config(steps=steps)
    config.optim.schedule = "constant"
    return config


def main(argv):
    del argv
    launch = distributed.initialize_from_flags()
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    # the resumed train() builds its step again: compile it once (the test's time budget)
    jax.config.update("jax_compilation_cache_dir", os.path.join(_WORKDIR.value + "_xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from free_transformer_jax import data as data_lib
    from free_transformer_jax import evaluate as eval_lib
    from free_transformer_jax import sharding as shard_lib
    from free_transformer_jax.checkpoint import load_model
    from free_transformer_jax.trainer import train

    t0, times = 0.0, {}  # process_time() counts from the process start: imports included

    def lap(name):  # CPU seconds of this process per phase (BUILD_NOTES "Multi-host")
        nonlocal t0
        times[name], t0 = round(time.process_time() - t0, 1), time.process_time()

    out = {"launch": launch.source if launch else None, "process_index": jax.process_index(),
           "process_count": jax.process_count(), "local_devices": jax.local_device_count(),
           "devices": jax.device_count()}
    config = run_config(STEPS_FIRST)
    per_process = config.train.batch_size // jax.process_count()
    it = data_lib.make_iterator(config, "train", batch_size=per_process, seed=config.train.seed)
    out["rows"] = [next(it)["inputs"].tolist() for _ in range(RECORDED)]  # what train() reads first

    lap("start-up and data")
    out["first"] = train(config, _WORKDIR.value)
    lap("train to 3")
    out["resumed"] = train(run_config(STEPS_TOTAL), _WORKDIR.value)
    lap("resume to 6")

    mesh = shard_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    ev_config, cfg, params, step = load_model(_WORKDIR.value, mesh=mesh)
    batches = data_lib.make_iterator(ev_config, "eval", batch_size=per_process, seed=0)
    with shard_lib.mesh_context(mesh):
        out["eval"] = eval_lib.evaluate(cfg, params, batches, jax.random.key(0), prior_samples=2,
                                        max_batches=2,
                                        put=lambda b: shard_lib.global_batch_from_host(b, mesh))
        # a whole pass whose streams run out at different steps on the two processes (8 streams
        # of 3,3,3,3,2,2,2,2 records): both must stop together, after 3 batches
        ev_config.data.synthetic_eval_size = 20
        batches = data_lib.make_iterator(ev_config, "eval", batch_size=per_process, seed=0)
        out["eval_full"] = eval_lib.evaluate(cfg, params, batches, jax.random.key(0), prior_samples=2,
                                             put=lambda b: shard_lib.global_batch_from_host(b, mesh))
    lap("evaluate")
    out["eval_step"] = step
    out["cpu_seconds"] = times
    with open(_OUT.value, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    app.run(main)
