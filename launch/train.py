"""Train a Free Transformer (or its baseline) from a config file.

    python launch/train.py --config=configs/demo.py --workdir=/tmp/ft_demo
    python launch/train.py --config=configs/8b.py --workdir=gs://bucket/run1 \
        --config.model.kappa_bits=0.25 --config.optim.lr=1e-4

Re-running with the same --workdir resumes from its latest checkpoint. Several processes (Cloud
TPU, SLURM, Open MPI, or --coordinator_address/--num_processes/--process_id and their FTJ_*
variables) are connected before anything touches a device: see free_transformer_jax/distributed.py.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from free_transformer_jax import distributed, hostmem
from free_transformer_jax.logs import setup_console_logging
from common import run  # launch/common.py: one-line errors shared by the launchers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and config.json "
                               "go here (local path or gs://...).")
distributed.define_flags()
_HOST_MALLOC = hostmem.define_flag()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_console_logging()  # -v sets the verbosity (INFO by default); Orbax/Grain INFO needs -v=1
    logging.info("%s", hostmem.configure(_HOST_MALLOC.value))  # before JAX starts its backend
    try:
        distributed.initialize_from_flags()
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")

    from free_transformer_jax.checkpoint import CheckpointError
    from free_transformer_jax.model.config import ConfigError
    from free_transformer_jax.sharding import MeshError
    from free_transformer_jax.trainer import TrainingError, train

    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, MeshError, CheckpointError, TrainingError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    jax.config.config_with_absl()  # --jax_* flags, e.g. --jax_log_compiles
    run(main)
