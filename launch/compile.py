"""Compile the real train step for a target without running it (ahead-of-time), and report
per-device memory and FLOPs per step, so a config that would not fit fails in minutes on a laptop.

    # a TPU topology, through libtpu (pip install "jax[tpu]"), on any host, even a CPU laptop:
    python launch/compile.py --config=configs/8b.py --topology=v5p-128 --hbm_gib=95 \
        --config.mesh.fsdp=-1 --config.mesh.data=1 --config.model.remat_policy=full
    # N simulated CPU devices:
    python launch/compile.py --config=configs/demo.py --cpu_devices=8

Exits with status 1 and a one-line message when the step needs more than --hbm_gib per device.
"""

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from common import run  # launch/common.py: one-line errors shared by the launchers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128, v5e-256, v4-64, or a "
                                "libtpu name such as 'v5p:4x4x4'.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Compile for N simulated CPU devices.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Memory per device; exit 1 when the step needs more. "
                              "Default: the TPU generation's HBM, none for CPU.")

# chips per slice name: vN-K counts TensorCores for v4/v5p (2 per chip) and chips for v5e/v6e.
_TPU = {"v4": ("v4", 2, 32), "v5p": ("v5p", 2, 95), "v5e": ("v5e", 1, 16), "v5litepod": ("v5e", 1, 16),
        "v6e": ("v6e", 1, 32)}


def topology_name(slice_name: str) -> tuple[str, float]:
    """('v5p:4x4x4', hbm GiB per chip) from 'v5p-128' (or a libtpu name passed through)."""
    if ":" in slice_name:
        gen = slice_name.split(":")[0]
        return slice_name, _TPU.get(gen, (gen, 1, float("nan")))[2]
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", slice_name)
    if not m:
        raise ValueError(f"--topology={slice_name!r}: expected e.g. v5p-128, v5e-64, v4-32, v6e-256 "
                         "or a libtpu topology such as 'v5p:2x2x2'")
    gen, per_chip, hbm = _TPU[m.group(1)]
    chips = int(m.group(2)) // per_chip
    if gen in ("v4", "v5p"):  # 3-D torus: smallest cube-ish shape of 4-chip (2x2x1) units
        dims = [1, 1, 1]
        i = 0
        while dims[0] * dims[1] * dims[2] < chips:
            dims[i % 3] *= 2
            i += 1
        if dims[0] * dims[1] * dims[2] != chips:
            raise ValueError(f"--topology={slice_name}: {chips} chips is not a power of two")
        dims.sort()
        return f"{gen}:{dims[0]}x{dims[1]}x{dims[2]}", hbm
    side = int(chips**0.5)
    shape = f"{side}x{chips // side}" if side * (chips // side) == chips else f"1x{chips}"
    return f"{gen}:{shape}", hbm


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(_TOPOLOGY.value) == bool(_CPU_DEVICES.value):
        sys.exit("error: pass exactly one of --topology or --cpu_devices")
    if _CPU_DEVICES.value:  # must happen before the CPU backend is first used
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}")

    import jax

    if _CPU_DEVICES.value:
        jax.config.update("jax_platforms", "cpu")
    import jax.numpy as jnp

    from free_transformer_jax import flops as flops_lib
    from free_transformer_jax import sharding as shard_lib
    from free_transformer_jax.model.config import ConfigError, ModelConfig
    from free_transformer_jax.train.optimizer import make_optimizer
    from free_transformer_jax.train.state import state_shardings
    from free_transformer_jax.train.step import BATCH_KEYS, jit_train_step

    config = _CONFIG.value
    try:
        cfg = ModelConfig.from_dict(config.model)
        hbm = _HBM_GIB.value
        if _TOPOLOGY.value:
            from jax.experimental import mesh_utils, topologies

            name, default_hbm = topology_name(_TOPOLOGY.value)
            hbm = hbm or default_hbm
            try:
                topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
            except Exception as e:  # libtpu missing or unknown topology
                sys.exit(f"error: could not get TPU topology {name!r} ({str(e).splitlines()[0]}); "
                         'install libtpu with pip install "jax[tpu]"')
            devices = list(topo.devices)
            shape = shard_lib.resolve_mesh_shape(config.mesh, len(devices))
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
            mesh = jax.sharding.Mesh(grid, shard_lib.MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
            target = f"{_TOPOLOGY.value} ({name}, {len(devices)} chips)"
        else:
            mesh = shard_lib.make_mesh(config.mesh)
            target = f"{len(mesh.devices.flat)} simulated CPU devices"
        t = config.train
        shard_lib.check_batch(t.batch_size, mesh, t.grad_accum)
    except (ConfigError, shard_lib.MeshError, ValueError) as e:
        sys.exit(f"error: {e}")

    tx = make_optimizer(config.optim, t.steps)
    abstract, shardings = state_shardings(cfg, tx, mesh)
    seq = config.data.seq_len
    batch_sh = shard_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((t.batch_size, seq), jnp.int32, sharding=batch_sh)
             for k in BATCH_KEYS}
    with shard_lib.mesh_context(mesh):
        step = jit_train_step(cfg, tx, mesh, shardings, t.seed, t.grad_accum)
        compiled = step.lower(abstract, batch).compile()

    mem = compiled.memory_analysis()
    gib = 2.0**30
    args = mem.argument_size_in_bytes / gib
    temp = mem.temp_size_in_bytes / gib
    out = mem.output_size_in_bytes / gib
    alias = mem.alias_size_in_bytes / gib
    total = args + temp + out - alias
    n_dev = len(mesh.devices.flat)
    fpt = flops_lib.train_flops_per_token(cfg, seq)
    step_flops = fpt["total"] * t.batch_size * seq
    print(f"target      {target}, mesh {dict(mesh.shape)}, remat={cfg.remat_policy}, "
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
    run(main)
