"""Compile the training program for a target without running it (ahead-of-time), and report
per-device memory and FLOPs per step, so a config that would not fit fails in minutes on a laptop.
The program is the one ``train()`` runs (``train.program.build_program``, learning-rate schedule
included); only the mesh's devices differ.

    # a TPU topology, through libtpu (pip install "jax[tpu]"), on any host, even a CPU laptop:
    python launch/compile.py --config=configs/8b.py --topology=v5p-128 --hbm_gib=95 \
        --config.mesh.fsdp=-1 --config.mesh.data=1 --config.model.remat_policy=full
    # N simulated CPU devices:
    python launch/compile.py --config=configs/demo.py --cpu_devices=8

Exits with status 1 and a one-line message when the step needs more than --hbm_gib per device.
"""

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from free_transformer_jax.logs import setup_console_logging
from common import run  # launch/common.py: one-line errors shared by the launchers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128, v5e-256, v4-64, or a "
                                "libtpu name such as 'v5p:4x4x4'.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Compile for N simulated CPU devices.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Memory per device; exit 1 when the step needs more. "
                              "Default: the TPU generation's HBM, none for CPU.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(_TOPOLOGY.value) == bool(_CPU_DEVICES.value):
        sys.exit("error: pass exactly one of --topology or --cpu_devices")
    setup_console_logging()
    if _CPU_DEVICES.value:  # must happen before the CPU backend is first used (not at import)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}")
        jax.config.update("jax_platforms", "cpu")

    from free_transformer_jax import flops as flops_lib
    from free_transformer_jax import topology as topo_lib
    from free_transformer_jax.model.config import ConfigError
    from free_transformer_jax.sharding import MeshError
    from free_transformer_jax.train.program import lower_for_target

    config = _CONFIG.value
    hbm = _HBM_GIB.value
    try:
        mesh = None  # --cpu_devices: the mesh train() builds, sharding.make_mesh(config.mesh)
        if _TOPOLOGY.value:
            mesh, name, default_hbm = topo_lib.topology_mesh(config.mesh, _TOPOLOGY.value)
            hbm = hbm or default_hbm
            target = f"{_TOPOLOGY.value} ({name}, {mesh.devices.size} chips)"
        else:
            target = f"{_CPU_DEVICES.value} simulated CPU devices"
        program, lowered = lower_for_target(config, mesh)
    except (ConfigError, MeshError, topo_lib.TopologyError) as e:
        sys.exit(f"error: {e}")
    compiled = lowered.compile()

    mem = compiled.memory_analysis()
    gib = 2.0**30
    args = mem.argument_size_in_bytes / gib
    temp = mem.temp_size_in_bytes / gib
    out = mem.output_size_in_bytes / gib
    alias = mem.alias_size_in_bytes / gib
    total = args + temp + out - alias
    cfg, t, seq = program.model, config.train, config.data.seq_len
    fpt = flops_lib.train_flops_per_token(cfg, seq)
    step_flops = fpt["total"] * program.tokens_per_step
    n_dev = program.mesh.devices.size
    print(f"target      {target}, mesh {dict(program.mesh.shape)}, remat={cfg.remat_policy}, "
          f"batch {t.batch_size} x {seq} (grad_accum {t.grad_accum})")
    print(f"memory/dev  arguments {args:.2f} GiB + temporaries {temp:.2f} GiB + outputs {out:.2f} GiB"
          f" - donated {alias:.2f} GiB = {total:.2f} GiB")
    print(f"flops/step  {step_flops:.3e} analytic ({step_flops / n_dev:.3e} per device; decoder "
          f"{fpt['decoder']:.3e}, encoder {fpt['encoder']:.3e}, latent {fpt['latent']:.3e} per token)")
    if hbm and total > hbm:
        sys.exit(f"error: needs {total:.2f} GiB per device but --hbm_gib={hbm:g}; shard more "
                 "(config.mesh.fsdp / tensor), use config.model.remat_policy=full, or lower "
                 "config.train.batch_size / raise config.train.grad_accum")
    print(f"fits        {total:.2f} GiB <= {hbm:g} GiB per device" if hbm else "fits        (no --hbm_gib)")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    jax.config.config_with_absl()  # --jax_* flags
    run(main)
