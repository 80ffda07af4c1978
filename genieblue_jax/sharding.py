"""Device mesh and regex-over-names sharding rules for parameters.

A mesh has named axes (`data`, `fsdp`, `tensor`); a size of -1 means "all remaining
devices". Rules are `(regex, spec)` pairs tried in order against a parameter's path
("layers_3/mlp/down_proj/kernel"); the first full match gives the PartitionSpec. A
parameter that no rule matches is an error (nothing is replicated by accident), and so is
a dimension that does not divide by the mesh axes it is sharded over.

    >>> mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})   # all devices on fsdp
    >>> shardings = param_shardings(models.abstract_params(cfg), mesh)
    >>> params = models.init_params(cfg, jax.random.key(0), shardings)
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from genieblue_jax import rules as rules_lib

MESH_AXES = ("data", "fsdp", "tensor")

# Megatron-style tensor parallelism (column-parallel in, row-parallel out) plus FSDP on the
# other dimension. Kernels are (in, out). Small vectors are replicated. Branch leaves reuse
# the base names (`vision_q_proj` is matched by `q_proj`), so they shard like the base.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r".*/lora_(a|b)", P()),  # rank-r adapters: tiny, replicated
    (r".*embed_tokens/embedding", P("tensor", "fsdp")),
    (r".*lm_head/kernel", P("fsdp", "tensor")),
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|in_proj|linear_1)/kernel", P("fsdp", "tensor")),
    (r".*(o_proj|down_proj|out_proj|fc2|linear_2)/kernel", P("tensor", "fsdp")),
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|in_proj|linear_1)/bias", P("tensor")),
    (r".*(o_proj|down_proj|out_proj|fc2|linear_2)/bias", P()),
    (r".*(norm|layernorm|layer_norm\d?)/(scale|bias)", P()),
    (r".*patch_embedding/(kernel|bias)", P()),
    (r".*position_embedding/embedding", P(None, "fsdp")),
    (r".*head/probe", P()),
)


def make_mesh(axes: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """Mesh over `devices` (default: all) with named axes; one size may be -1."""
    axes = dict(axes or {"data": -1, "fsdp": 1, "tensor": 1})
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; allowed: {MESH_AXES}")
    fill = [k for k, v in axes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill}")
    known = math.prod(v for v in axes.values() if v != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes {axes}")
        axes[fill[0]] = len(devices) // known
    if math.prod(axes.values()) != len(devices):
        raise ValueError(f"mesh {axes} needs {math.prod(axes.values())} devices, have {len(devices)}")
    names = tuple(axes)
    return Mesh(np.asarray(devices).reshape(tuple(axes[n] for n in names)), names)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec of one parameter; raises naming the parameter if uncovered or indivisible."""
    try:
        spec = rules_lib.first_match(rules, path, what="sharding rule")
    except ValueError as e:
        raise ValueError(f"{e} (shape {shape})") from None
    if len(spec) > len(shape):
        raise ValueError(f"the sharding rule for {path!r} gives {spec}, for a parameter of rank {len(shape)}")
    for dim, axis in zip(shape, spec):
        names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
        size = math.prod(mesh.shape[a] for a in names if a in mesh.shape)
        if dim % size:
            raise ValueError(f"parameter {path!r}: dimension {dim} of shape {shape} does not divide "
                             f"by mesh axes {names} of total size {size}")
    # Drop axes the mesh does not have (e.g. a 1-axis mesh) so specs stay valid.
    return P(*(a if a is None or (a in mesh.shape if isinstance(a, str) else all(x in mesh.shape for x in a))
               else None for a in spec))


def param_shardings(abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """Tree of NamedShardings matching `abstract_tree` (e.g. `models.abstract_params(cfg)`),
    empty subtrees included (a variant without a branch has `"branch": {}`)."""
    def sharding(keys, x):
        name = "/".join(str(getattr(k, "key", k)) for k in keys)  # as models.flatten names it
        return NamedSharding(mesh, spec_for(name, tuple(x.shape), mesh, rules))

    return jax.tree_util.tree_map_with_path(sharding, abstract_tree)


def single_device_shardings(abstract_tree, device=None):
    """A SingleDeviceSharding on `device` (default: the first device) for every leaf."""
    device = device or jax.devices()[0]
    return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract_tree)
