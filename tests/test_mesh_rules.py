import pytest

from hal import UserError
from hal.mesh import LOGICAL_RULES, choose, partition, resolve, rule_for
from models.spec import SIZES, logical_axes, param_shapes


@pytest.mark.parametrize("instance,devices,expected", [
    ("tpu-v5p-128", 64, {"data": 1, "fsdp": 64, "tensor": 1}),
    ("tpu-v6e-256", 256, {"data": 1, "fsdp": 256, "tensor": 1}),
    ("p5.48xlarge", 16, {"data": 2, "fsdp": 8, "tensor": 1}),          # two 8xH100 nodes: HSDP
    ("a3-highgpu-8g", 8, {"data": 1, "fsdp": 8, "tensor": 1}),
    ("trn1.32xlarge", 32, {"data": 1, "fsdp": 16, "tensor": 2}),       # 16 chips x 2 NeuronCores
    ("trn2.48xlarge", 64, {"data": 1, "fsdp": 16, "tensor": 4}),       # 16 chips x 4 logical cores
])
def test_platform_rules(instance, devices, expected):
    mesh, source = choose(None, "auto", instance, devices)
    assert mesh == expected and instance in source


def test_explicit_mesh_wins_and_default_is_fsdp():
    assert choose({"data": 2, "fsdp": -1}, "auto", "trn2.48xlarge", 8)[0] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert choose(None, "auto", None, 8)[0] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert choose(None, "trn1.32xlarge", None, 4)[0] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert rule_for("unknown-box") is None


@pytest.mark.parametrize("axes,n,msg", [
    ({"data": 3, "fsdp": -1}, 8, "does not divide"),
    ({"data": 2, "fsdp": 2}, 8, "multiply to 8"),
    ({"data": -1, "fsdp": -1}, 8, "only one axis"),
    ({"pipeline": 2}, 8, "unknown axes"),
    ({"data": 0}, 8, "positive integer"),
])
def test_bad_meshes(axes, n, msg):
    with pytest.raises(UserError, match=msg):
        resolve(axes, n)
    with pytest.raises(UserError, match="matches no rule"):
        choose(None, "tpu-v99", None, 8)


def test_partition_follows_logical_rules():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    cfg = SIZES["tiny"]
    specs = {k: partition(logical_axes(k, s), s, sizes) for k, s in param_shapes(cfg).items()}
    assert specs["model.layers.0.self_attn.q_proj.weight"] == ("tensor", "fsdp")
    assert specs["model.layers.0.mlp.down_proj.weight"] == ("fsdp", "tensor")
    assert specs["model.norm.weight"] == (None,)
    assert specs["model.embed_tokens.weight"] == (None, "fsdp")      # vocab 257: tensor=2 does not divide it
    assert partition(("batch",), (8,), sizes) == (("data", "fsdp"),)
    assert set(LOGICAL_RULES) >= {a for k, s in param_shapes(cfg).items() for a in logical_axes(k, s)}
