"""Meshes: the config's axis sizes, or a platform rule per instance type, resolved against the devices.

Framework-free. Axes are (data, fsdp, tensor): data replicates the state and splits the batch; fsdp
splits the batch and shards the state; tensor shards heads/mlp/vocab inside a layer.
"""
from __future__ import annotations

import fnmatch
import math
import os

from hal.base import UserError

AXES = ("data", "fsdp", "tensor")

# Platform rules, in the spirit of AXLearn's mesh_rules: the first pattern matching the instance type
# wins. -1 means "the rest of the devices". Chosen when hal.mesh_rule=auto (the default) and an
# instance type is known (hal.instance_type or $TRICHIP_INSTANCE_TYPE).
MESH_RULES: list[tuple[str, dict[str, int]]] = [
    # TPU slices: FSDP over the slice (ICI); several slices replicate over data (DCN).
    ("tpu-v5p-*", {"data": 1, "fsdp": -1, "tensor": 1}),
    ("tpu-v6e-*", {"data": 1, "fsdp": -1, "tensor": 1}),
    ("tpu-v5e-*", {"data": 1, "fsdp": -1, "tensor": 1}),
    # 8-GPU nodes: FSDP inside the node (NVLink); across nodes, data parallel (HSDP).
    ("p5.48xlarge", {"data": -1, "fsdp": 8, "tensor": 1}),       # 8x H100 (AWS)
    ("p5e.48xlarge", {"data": -1, "fsdp": 8, "tensor": 1}),      # 8x H200 (AWS)
    ("a3-*gpu-8g", {"data": -1, "fsdp": 8, "tensor": 1}),         # 8x H100 (GCP a3-highgpu-8g, a3-megagpu-8g)
    ("gpu-8xh100", {"data": -1, "fsdp": 8, "tensor": 1}),
    # Trainium: tensor parallel inside a chip (its NeuronCores share HBM), FSDP across chips.
    ("trn1.32xlarge", {"data": 1, "fsdp": -1, "tensor": 2}),     # 16 chips x 2 NeuronCores
    ("trn1n.32xlarge", {"data": 1, "fsdp": -1, "tensor": 2}),
    ("trn2.48xlarge", {"data": 1, "fsdp": -1, "tensor": 4}),     # 16 chips x 4 logical cores (LNC=2)
    ("trn2u.48xlarge", {"data": 1, "fsdp": -1, "tensor": 4}),    # Trn2 UltraServer node (4 per server)
]


def instance_type(configured: str | None) -> str | None:
    return configured or os.environ.get("TRICHIP_INSTANCE_TYPE") or None


def rule_for(instance: str | None) -> dict[str, int] | None:
    if not instance:
        return None
    for pattern, mesh in MESH_RULES:
        if fnmatch.fnmatch(instance, pattern):
            return dict(mesh)
    return None


def resolve(axes: dict[str, int], n_devices: int) -> dict[str, int]:
    """Fill in the one -1 axis and check that the mesh covers exactly n_devices."""
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise UserError(f"hal.mesh has unknown axes {unknown}; the axes are {list(AXES)}")
    sizes = {a: axes.get(a, 1) for a in AXES}
    for a, s in sizes.items():
        if not isinstance(s, int) or isinstance(s, bool) or (s < 1 and s != -1):
            raise UserError(f"hal.mesh.{a} must be a positive integer or -1 (the rest), got {s!r}")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise UserError(f"hal.mesh: only one axis may be -1, got {rest}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n_devices % known:
            raise UserError(f"hal.mesh {axes} does not divide the {n_devices} devices "
                            f"({known} does not divide {n_devices})")
        sizes[rest[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise UserError(f"hal.mesh {sizes} has {math.prod(sizes.values())} devices but there are {n_devices}; "
                        f"make the axis sizes multiply to {n_devices} (or use -1 for one axis)")
    return sizes


def choose(mesh_cfg: dict | None, rule: str, instance: str | None, n_devices: int) -> tuple[dict[str, int], str]:
    """The mesh to use and where it came from (for the log): hal.mesh if set, else the rule named by
    hal.mesh_rule (auto: the instance type's rule), else data parallel over every device."""
    if mesh_cfg:
        return resolve(dict(mesh_cfg), n_devices), "hal.mesh"
    name = instance if rule == "auto" else rule
    if rule not in ("auto", "none"):
        if rule_for(rule) is None:
            raise UserError(f"hal.mesh_rule={rule!r} matches no rule; known: {[p for p, _ in MESH_RULES]}")
    if rule != "none" and rule_for(name) is not None:
        return resolve(rule_for(name), n_devices), f"mesh rule for {name}"
    return resolve({"fsdp": -1}, n_devices), "FSDP over all devices"


def check_tensor_degree(cfg, tensor: int, framework: str) -> None:
    """Raise UserError unless the tensor degree splits the heads and the MLP evenly. The KV heads too on
    torch, whose tensor parallelism gives each rank whole KV heads; JAX replicates k/v projections its
    tensor axis does not divide (grouped-query attention with fewer KV heads than the degree)."""
    if tensor == 1:
        return
    sizes = [("model.num_attention_heads", cfg.num_attention_heads),
             ("model.intermediate_size", cfg.intermediate_size)]
    if framework == "torch":
        kv = cfg.num_key_value_heads
        if kv < tensor:
            raise UserError(f"hal.mesh.tensor={tensor} exceeds model.num_key_value_heads ({kv}): hal=torch splits "
                            f"whole KV heads over the tensor ranks; use hal.mesh.tensor <= {kv} (or hal=jax)")
        sizes.append(("model.num_key_value_heads", kv))
    for field, n in sizes:
        if n % tensor:
            raise UserError(f"hal.mesh.tensor={tensor} does not divide {field} ({n}); choose a tensor degree "
                            f"that divides it")


def partition(logical: tuple, shape: tuple, sizes: dict[str, int]) -> tuple:
    """Mesh axes for each dimension (a tuple entry: None, an axis name, or a tuple of names).
    A dimension that its mesh axes do not divide stays replicated; no mesh axis is used twice."""
    used, out = set(), []
    for axis, dim in zip(logical, shape):
        mapped = LOGICAL_RULES.get(axis)
        names = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
        names = tuple(n for n in names if sizes.get(n, 1) > 1 and n not in used)
        if not names or dim % math.prod(sizes[n] for n in names):
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return tuple(out)


# Logical axis -> mesh axis (or axes). Dimensions a mesh axis does not divide stay replicated.
LOGICAL_RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "norm": None,
    # activations: the residual stream's sequence on the tensor axis (sequence parallelism)
    "seq": "tensor", "act_embed": None,
}
