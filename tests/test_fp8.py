"""trainer.precision=fp8: refused in one line where the chip has no float8 matmuls (every CPU here), and the
float8 matmuls themselves, run on the CPU through the functions the backends use on a GPU (JAX's
models.llama_jax.fp8_matmul_t, torch's models.llama_torch.convert_to_fp8 with torchao's Float8Linear).

Error bounds: round-to-nearest into a float format with m mantissa bits has relative error |d| <= 2^-(m+1)
(normal range; per-tensor scaling puts the largest value at the format's maximum, so random data sits there).
A product of two quantized operands carries d_a + d_b, and for independent errors the relative Frobenius
error of a matmul is about rms(d_a + d_b) <= sqrt(u_a^2 + u_b^2). e4m3 (m=3, u=2^-4) x e4m3 in the forward:
sqrt(2) 2^-4 = 0.088; an e5m2 gradient (m=2, u=2^-3) times an e4m3 operand in the backward:
sqrt(2^-6 + 2^-8) = 0.14.
"""
import math
import sys

import numpy as np
import pytest

import hal
from hal.base import UserError, check_fp8
from models.spec import SIZES, reference_init

FORWARD_BOUND = math.sqrt(2) * 2 ** -4
BACKWARD_BOUND = math.sqrt(2 ** -6 + 2 ** -8)


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- refusal -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0), (12, 0)])
def test_fp8_gpus_pass(capability):
    check_fp8("some GPU", capability)


@pytest.mark.parametrize("chip, capability", [("NVIDIA A100-SXM4-80GB", (8, 0)), ("Tesla T4", (7, 5)),
                                              ("TPU v5 lite", None), ("cpu", None), ("neuron", None)])
def test_chips_without_fp8_are_refused_in_one_line(chip, capability):
    with pytest.raises(UserError) as e:
        check_fp8(chip, capability)
    assert "\n" not in str(e.value) and chip in str(e.value) and "trainer.precision=bf16" in str(e.value)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_fp8_refused_on_cpu_through_make_backend(framework):
    with pytest.raises(UserError) as e:
        hal.make_backend({"framework": framework, "platform": "cpu"}, SIZES["tiny"], hal.OptimizerSpec(), "fp8")
    message = str(e.value)
    assert "\n" not in message and "cpu has none" in message and "trainer.precision=bf16" in message


def test_fp8_is_a_precision_of_the_schema_and_fp16_is_not():
    from launch.train import config_error
    assert config_error(["trainer.precision=fp8"])[0] is None
    message, _ = config_error(["trainer.precision=fp16"])
    assert message and "\n" not in message and "precision" in message
    with pytest.raises(UserError, match="fp32, bf16, fp8"):
        hal.make_backend({"framework": "jax", "platform": "cpu"}, SIZES["tiny"], hal.OptimizerSpec(), "fp16")


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_fp8_refused_on_cpu_through_the_run_config(framework, tmp_path):
    from tests.conftest import train
    with pytest.raises(UserError) as e:
        train(tmp_path / "run", f"hal={framework}", "model=tiny", "trainer.precision=fp8", "trainer.steps=1",
              "trainer.global_batch=2", "trainer.seq_len=16", "trainer.eval_every=0")
    assert "\n" not in str(e.value) and "use trainer.precision=bf16" in str(e.value)


# -- JAX: the custom_vjp float8 matmul -------------------------------------------------------------------------

def _jax_operands():
    import jax
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kx, (2, 32, 256)), jax.random.normal(kw, (128, 256)),
            jax.random.normal(kg, (2, 32, 128)))


def test_jax_fp8_matmul_is_within_the_float8_error_of_fp32():
    import jax
    import jax.numpy as jnp
    from models.llama_jax import fp8_matmul_t, matmul_t
    x, w, g = _jax_operands()
    y = fp8_matmul_t(x, w)
    exact = matmul_t(x, w)
    assert y.shape == exact.shape == (2, 32, 128) and y.dtype == jnp.float32
    assert 1e-3 < _relative(y, exact) < FORWARD_BOUND       # quantized, and no worse than e4m3 allows
    dx, dw = jax.grad(lambda x, w: jnp.sum(fp8_matmul_t(x, w) * g), (0, 1))(x, w)
    rx, rw = jax.grad(lambda x, w: jnp.sum(matmul_t(x, w) * g), (0, 1))(x, w)
    assert 1e-3 < _relative(dx, rx) < BACKWARD_BOUND
    assert 1e-3 < _relative(dw, rw) < BACKWARD_BOUND
    yb = jax.jit(fp8_matmul_t)(x.astype(jnp.bfloat16), w)      # the model's path: bf16 in, bf16 out
    assert yb.dtype == jnp.bfloat16 and _relative(yb.astype(jnp.float32), exact) < FORWARD_BOUND


def test_jax_fp8_matmul_quantizes_e4m3_forward_and_e5m2_backward():
    """The forward is exactly the product of the e4m3-quantized operands; the input gradient exactly that of
    the e5m2-quantized output gradient and the e4m3 weight (and measurably not an e4m3 gradient's)."""
    import jax
    import jax.numpy as jnp
    from models.llama_jax import fp8_matmul_t, fp8_quantize
    x, w, g = _jax_operands()

    def dequantized(a, dtype):
        q, scale = fp8_quantize(a, dtype)
        assert q.dtype == dtype
        return np.asarray(q.astype(jnp.float32), np.float64) * float(scale)
    xq, wq = dequantized(x.reshape(-1, 256), jnp.float8_e4m3fn), dequantized(w, jnp.float8_e4m3fn)
    np.testing.assert_allclose(np.asarray(fp8_matmul_t(x, w)).reshape(-1, 128), xq @ wq.T, rtol=1e-4, atol=1e-3)
    dx = np.asarray(jax.grad(lambda x: jnp.sum(fp8_matmul_t(x, w) * g))(x)).reshape(-1, 256)
    g2 = g.reshape(-1, 128)
    np.testing.assert_allclose(dx, dequantized(g2, jnp.float8_e5m2) @ wq, rtol=1e-4, atol=1e-3)
    assert _relative(dx, dequantized(g2, jnp.float8_e4m3fn) @ wq) > 1e-2


def test_jax_fp8_quantize_scales_each_tensor_by_its_amax():
    import jax.numpy as jnp
    from models.llama_jax import fp8_quantize
    x = jnp.array([[0.5, -3.0], [1e-3, 2.0]])
    for dtype, largest in ((jnp.float8_e4m3fn, 448.0), (jnp.float8_e5m2, 57344.0)):
        q, scale = fp8_quantize(x, dtype)
        assert float(scale) == pytest.approx(3.0 / largest) and float(jnp.abs(q.astype(jnp.float32)).max()) == largest
    q, scale = fp8_quantize(jnp.zeros((2, 2)), jnp.float8_e4m3fn)
    assert float(scale) == 1.0 and not np.asarray(q.astype(jnp.float32)).any()


@pytest.mark.slow
def test_jax_fp8_model_keeps_the_parameter_tree_and_follows_fp32():
    """fp8 routes the blocks' projections through fp8_matmul_t: the same parameters (a checkpoint of either
    precision loads in the other), and a loss and gradients close to the fp32 model's. At the reference init
    each block is close to the identity, so a gradient carries about one quantized product's error and the
    per-matmul bound holds for the whole model (larger weights compound it over the layers)."""
    import jax
    import jax.numpy as jnp
    from models import llama_jax
    from models.spec import flatten, nest
    cfg = SIZES["tiny"]
    params = nest(reference_init(cfg, 0))
    tokens = np.random.default_rng(0).integers(0, 256, (2, 33)).astype(np.int32)
    results = {}
    for fp8 in (False, True):
        net = llama_jax.LlamaForCausalLM(cfg, dtype=jnp.float32, fp8=fp8)
        tree = jax.tree.map(lambda a: a.shape, jax.eval_shape(net.init, jax.random.key(0), tokens[:, :-1])["params"])
        loss = lambda p: llama_jax.cross_entropy(net.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])
        results[fp8] = (tree, *jax.jit(jax.value_and_grad(loss))(params))
    assert results[True][0] == results[False][0] == jax.tree.map(lambda a: a.shape, params)
    assert results[True][1] != results[False][1]
    assert abs(float(results[True][1]) - float(results[False][1])) < 1e-3 * float(results[False][1])
    g8, g32 = flatten(results[True][2]), flatten(results[False][2])
    assert _relative(np.concatenate([np.ravel(g8[k]) for k in g32]), np.concatenate([np.ravel(g32[k]) for k in g32])) \
        < BACKWARD_BOUND


# -- torch: torchao's Float8Linear -------------------------------------------------------------------------------

def _torch_model(cfg):
    import torch
    from models import llama_torch
    net = llama_torch.LlamaForCausalLM(cfg)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in reference_init(cfg, 0).items()})
    return net


@pytest.mark.parametrize("tied", [False, True])
def test_torch_conversion_takes_the_block_projections_only(tied):
    pytest.importorskip("torchao")
    import dataclasses
    import torch
    from torchao.float8.float8_linear import Float8Linear
    from models import llama_torch
    cfg = dataclasses.replace(SIZES["tiny"], tie_word_embeddings=tied)
    with torch.device("meta"):                   # as the backend converts it: before it has storage
        net = llama_torch.LlamaForCausalLM(cfg)
    before = {k: (v.shape, v.dtype) for k, v in net.state_dict().items()}
    names = llama_torch.convert_to_fp8(net)
    assert names == [f"model.layers.{i}.{p}" for i in range(cfg.num_hidden_layers)
                     for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert not isinstance(getattr(net, "lm_head", None), Float8Linear)
    assert {k: (v.shape, v.dtype) for k, v in net.state_dict().items()} == before
    config = net.model.layers[0].mlp.up_proj.config
    assert config.cast_config_input.target_dtype == torch.float8_e4m3fn
    assert config.cast_config_weight.target_dtype == torch.float8_e4m3fn
    assert config.cast_config_grad_output.target_dtype == torch.float8_e5m2


def test_torch_float8_linear_is_within_the_float8_error_of_fp32():
    """torch._scaled_mm runs on CPU tensors, so torchao's Float8Linear itself is measured here."""
    pytest.importorskip("torchao")
    import torch
    from models import llama_torch
    cfg = SIZES["tiny"]
    ref, net = _torch_model(cfg), _torch_model(cfg)
    llama_torch.convert_to_fp8(net)
    layer, exact = net.model.layers[0].mlp.up_proj, ref.model.layers[0].mlp.up_proj
    torch.manual_seed(0)
    x, g = torch.randn(64, cfg.hidden_size), torch.randn(64, cfg.intermediate_size)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [layer(xs[0]), exact(xs[1])]
    assert 1e-3 < _relative(ys[0].detach(), ys[1].detach()) < FORWARD_BOUND
    for y in ys:
        (y * g).sum().backward()
    assert 1e-3 < _relative(xs[0].grad, xs[1].grad) < BACKWARD_BOUND
    assert 1e-3 < _relative(layer.weight.grad, exact.weight.grad) < BACKWARD_BOUND


def test_torch_fp8_model_follows_fp32_under_bf16_autocast():
    """As the JAX model test, through torchao's Float8Linear with the rest in bf16 (autocast, as the backend
    runs trainer.precision=fp8 without FSDP2)."""
    pytest.importorskip("torchao")
    import torch
    from models import llama_torch
    cfg = SIZES["tiny"]
    ref, net = _torch_model(cfg), _torch_model(cfg)
    llama_torch.convert_to_fp8(net)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 33)))
    losses = []
    for model, autocast in ((ref, False), (net, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = llama_torch.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] != losses[1] and abs(losses[0] - losses[1]) < 1e-3 * losses[0]
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (net, ref)]
    assert _relative(*grads) < BACKWARD_BOUND


def test_torch_without_torchao_is_one_line(monkeypatch):
    import torch
    from models import llama_torch
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")] or ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)
    with torch.device("meta"):
        net = llama_torch.LlamaForCausalLM(SIZES["tiny"])
    with pytest.raises(UserError) as e:
        llama_torch.convert_to_fp8(net)
    assert "\n" not in str(e.value) and "pip install 'trichip[fp8]'" in str(e.value)
