"""TPU slices without TPUs: a slice name -> libtpu topology -> a mesh of its (abstract) devices,
for ahead-of-time compilation of the training program (``launch/compile.py``)."""

from __future__ import annotations

import re
from typing import Mapping

import jax
from jax.sharding import Mesh

from free_transformer_jax import sharding as shard_lib

# slice generation -> (libtpu generation, cores per chip in the slice name, HBM GiB per chip).
# vN-K counts TensorCores for v4/v5p (2 per chip) and chips for v5e/v6e.
_TPU = {"v4": ("v4", 2, 32), "v5p": ("v5p", 2, 95), "v5e": ("v5e", 1, 16), "v5litepod": ("v5e", 1, 16),
        "v6e": ("v6e", 1, 32)}


class TopologyError(ValueError):
    """An unknown slice name or a topology libtpu cannot describe."""


def topology_name(slice_name: str) -> tuple[str, float]:
    """('v5p:4x4x4', HBM GiB per chip) from 'v5p-128' (a libtpu name such as 'v5p:2x2x2' passes
    through)."""
    if ":" in slice_name:
        gen = slice_name.split(":")[0]
        return slice_name, _TPU.get(gen, (gen, 1, float("nan")))[2]
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", slice_name)
    if not m:
        raise TopologyError(f"--topology={slice_name!r}: expected e.g. v5p-128, v5e-64, v4-32, "
                            "v6e-256 or a libtpu topology such as 'v5p:2x2x2'")
    gen, per_chip, hbm = _TPU[m.group(1)]
    chips = int(m.group(2)) // per_chip
    if gen in ("v4", "v5p"):  # 3-D torus: the smallest cube-ish shape
        dims = [1, 1, 1]
        i = 0
        while dims[0] * dims[1] * dims[2] < chips:
            dims[i % 3] *= 2
            i += 1
        if dims[0] * dims[1] * dims[2] != chips:
            raise TopologyError(f"--topology={slice_name}: {chips} chips is not a power of two")
        # ascending, except that a slice one chip deep is named 2x2x1 (libtpu refuses 1x2x2)
        dims.sort(key=lambda d: (d == 1, d))
        return f"{gen}:{dims[0]}x{dims[1]}x{dims[2]}", hbm
    side = int(chips**0.5)
    shape = f"{side}x{chips // side}" if side * (chips // side) == chips else f"1x{chips}"
    return f"{gen}:{shape}", hbm


def topology_mesh(mesh_cfg: Mapping[str, int], slice_name: str) -> tuple[Mesh, str, float]:
    """(mesh over the slice's devices laid out like the config's ``mesh`` section, libtpu
    topology name, HBM GiB per chip). Needs libtpu (``pip install "jax[tpu]"``), not a TPU."""
    from jax.experimental import mesh_utils, topologies

    name, hbm = topology_name(slice_name)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu missing or an unknown topology: its own error types vary
        raise TopologyError(f"could not get TPU topology {name!r} ({str(e).splitlines()[0]}); "
                            'install libtpu with pip install "jax[tpu]"') from e
    devices = list(topo.devices)
    shape = shard_lib.resolve_mesh_shape(mesh_cfg, len(devices))
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    auto = (jax.sharding.AxisType.Auto,) * len(shard_lib.MESH_AXES)
    return Mesh(grid, shard_lib.MESH_AXES, axis_types=auto), name, hbm
