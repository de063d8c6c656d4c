"""Meshes, the logical-axis rules table, and host data -> global arrays.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and
optimizer state sharded, ZeRO-3 style), ``tensor`` (Megatron-style model parallelism over heads,
MLP width, vocabulary and latent codes). ``mesh.dcn_data > 1`` builds the data axis across slices
(multi-slice TPU / multi-node GPU), with fsdp and tensor kept inside a slice.

Every logical name used by the model is mapped in ONE table, :data:`LOGICAL_RULES`; a name missing
from it is an error, not a silent replication.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("latent_codes", "tensor"),
    ("latent_bits", None),
)
_RULES = dict(LOGICAL_RULES)


class MeshError(ValueError):
    """A mesh or batch layout that cannot work; the message names the field and the fix."""


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with one -1 filled in; checks the product is the device count."""
    sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"mesh: only one axis may be -1, got {free}; give explicit sizes to the others")
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise MeshError(f"mesh.{a}={s}: sizes must be positive (or -1 for the remaining devices)")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise MeshError(f"mesh: the fixed axes multiply to {fixed}, which does not divide the "
                            f"{n_devices} devices; change mesh.{'/'.join(MESH_AXES)}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise MeshError(f"mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = "
                        f"{math.prod(sizes.values())} but there are {n_devices} devices; make them "
                        "multiply to the device count (or set one axis to -1)")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types (linen's logical constraints need them)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    dcn = int(mesh_cfg.get("dcn_data", 1))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if dcn > 1:
        if shape[0] % dcn:
            raise MeshError(f"mesh.dcn_data={dcn} must divide the data axis size {shape[0]}")
        from jax.experimental import mesh_utils

        ici = (shape[0] // dcn, shape[1], shape[2])
        if all(hasattr(d, "slice_index") for d in devices):  # multi-slice TPU
            grid = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices=devices)
        elif jax.process_count() > 1:  # multi-node GPU: a node (process) is the fast domain
            grid = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices=devices,
                                                        process_is_granule=True)
        else:  # one process (e.g. simulated devices): consecutive device groups play the slices
            groups = np.asarray(devices, dtype=object).reshape(dcn, -1)
            grid = np.concatenate([g.reshape(ici) for g in groups], axis=0)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def mesh_axes_for(logical: str | None) -> Any:
    if logical is None:
        return None
    if logical not in _RULES:
        raise MeshError(f"logical axis {logical!r} has no rule in sharding.LOGICAL_RULES; add one")
    return _RULES[logical]


def axis_size(mesh: Any, axes: Any) -> int:
    """Devices along ``axes`` (a mesh axis name, a tuple of them, or None) of a mesh (concrete or
    abstract)."""
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                        where: str = "") -> NamedSharding:
    """NamedSharding for an array with logical dim ``names``. A dimension that the mapped mesh
    axes do not divide is replicated (logged), e.g. 2 kv heads on a tensor axis of 4."""
    spec, used = [], set()
    for name, dim in zip(names, shape):
        axes = mesh_axes_for(name)
        axes_t = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes_t = tuple(a for a in axes_t if a not in used and mesh.shape[a] > 1)
        if axes_t and dim % axis_size(mesh, axes_t):
            logging.info("sharding: %s dim %r of size %d not divisible by mesh axes %s (size %d); "
                         "replicating it", where, name, dim, axes_t, axis_size(mesh, axes_t))
            axes_t = ()
        used.update(axes_t)
        spec.append(None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t))
    return NamedSharding(mesh, P(*spec))


def param_shardings(boxed_abstract: Any, mesh: Mesh) -> Any:
    """Shardings for an (abstract) boxed parameter tree from its logical names (unboxed result)."""
    def one(path, leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return logical_to_sharding(leaf.names, leaf.value.shape, mesh, jax.tree_util.keystr(path))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(
        one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, grad_accum: int = 1, field: str = "train.batch_size"):
    """The (micro-)batch must split evenly over the batch-parallel devices and the processes."""
    if global_batch % grad_accum:
        raise MeshError(f"{field}={global_batch} is not divisible by train.grad_accum={grad_accum}")
    n = axis_size(mesh, BATCH_AXES)
    micro = global_batch // grad_accum
    if micro % n:
        raise MeshError(f"{field}={global_batch} (micro-batch {micro}) must be divisible by "
                        f"mesh data*fsdp = {n}; change the batch size or the mesh")
    if global_batch % jax.process_count():
        raise MeshError(f"{field}={global_batch} must be divisible by the {jax.process_count()} "
                        "processes")


def global_batch_from_host(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy arrays (this host's slice of the batch, rows in process order) -> global
    jax Arrays sharded over the batch axes."""
    out = {}
    for k, v in host_batch.items():
        v = np.asarray(v)
        sharding = batch_sharding(mesh, v.ndim)
        if jax.process_count() == 1:
            out[k] = jax.device_put(v, sharding)
        else:
            out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """The context every sharded computation runs in: the mesh and the logical-axis rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def put_replicated_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds whole (e.g. tokenized prompts), sharded over the
    mesh's batch axes along its leading dimension: each device takes its rows of it."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) sharded array as numpy, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
