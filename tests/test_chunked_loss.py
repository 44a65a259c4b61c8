"""The chunked cross-entropy (trainer.loss_chunk) against the loss through the whole logits, on both frameworks:
the same value and gradients (w.r.t. the hidden states, the output weight and, through the model, every
parameter) for chunks that divide the positions and chunks that do not, tied and untied; and a train step of
each backend with and without chunking gives the same loss and gradient norm. Float32 throughout: the gaps
are float32 roundings of sums taken in another order (bounds from tests/tolerances.py)."""
import dataclasses

import numpy as np
import pytest

from hal import HostState, OptimizerSpec, make_backend
from models.spec import SIZES, flatten, nest, reference_init
from tests.tolerances import GRADIENT_RTOL, LOSS_RTOL

B, T, HIDDEN, VOCAB = 2, 24, 16, 301
POSITIONS = [1, 8, 7, 24, 100]         # positions a chunk: dividing T, not dividing it, all of T, more than T
TIED = {"untied": SIZES["tiny"], "tied": dataclasses.replace(SIZES["tiny"], tie_word_embeddings=True)}


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, T, HIDDEN)).astype(np.float32), (0.3 * rng.normal(size=(VOCAB, HIDDEN))).astype(np.float32),
            rng.integers(0, VOCAB, (B, T)).astype(np.int32))


def gap(a, b) -> float:
    """max |a - b| / max |b|."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def assert_same(plain, chunked):
    """(loss, {name: gradient}) twice: the loss within LOSS_RTOL, each gradient within GRADIENT_RTOL."""
    assert abs(chunked[0] - plain[0]) <= LOSS_RTOL * abs(plain[0]), (chunked[0], plain[0])
    assert plain[1].keys() == chunked[1].keys()
    for name, g in plain[1].items():
        assert np.abs(g).max() > 0, name
        assert gap(chunked[1][name], g) <= GRADIENT_RTOL, (name, gap(chunked[1][name], g))


# -- the loss functions -------------------------------------------------------------------------------------

def jax_value_and_grads(loss, *args):
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(*args)
    return float(value), {"h": np.asarray(grads[0]), "w": np.asarray(grads[1])}


@pytest.mark.parametrize("positions", POSITIONS)
def test_jax_chunked_equals_plain(positions):
    from models.llama_jax import chunked_cross_entropy, cross_entropy, matmul_t
    h, w, y = inputs()
    plain = jax_value_and_grads(lambda h, w: cross_entropy(matmul_t(h, w), y), h, w)
    chunked = jax_value_and_grads(lambda h, w: chunked_cross_entropy(h, w, y, positions), h, w)
    assert_same(plain, chunked)


def test_jax_chunk_longer_than_the_rows_takes_the_rows_unpadded():
    """A chunk of more positions than a row holds is one chunk of the whole row: no padded positions, whose
    logits would cost more than the whole logits."""
    import jax
    from models.llama_jax import chunked_cross_entropy
    h, w, y = inputs()
    jaxpr = jax.make_jaxpr(jax.grad(lambda h, w: chunked_cross_entropy(h, w, y, 97), argnums=(0, 1)))(h, w)
    dims = {d for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars for d in getattr(v.aval, "shape", ())}
    assert T in dims and 97 not in dims


def test_jax_bf16_chunks_sum_the_weight_gradient_in_float32():
    """Under bf16 the scan over the chunks carries the output weight's gradient in float32 (the weight's own
    dtype), as torch's chunked loss sums it: a bf16 carry would round the sum at every chunk."""
    import jax
    import jax.numpy as jnp
    from models.llama_jax import chunked_cross_entropy
    h, w, y = inputs()
    jaxpr = jax.make_jaxpr(jax.grad(lambda hh, ww: chunked_cross_entropy(hh, ww, y, 4), argnums=1))(
        jnp.asarray(h, jnp.bfloat16), w)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    carried = [v.aval.dtype for e in scans for v in e.outvars if getattr(v.aval, "shape", ()) == (VOCAB, HIDDEN)]
    assert carried and all(d == jnp.float32 for d in carried), carried


def torch_value_and_grads(loss, h, w):
    import torch
    h, w = (torch.from_numpy(a).requires_grad_() for a in (h, w))
    value = loss(h, w)
    value.backward()
    return float(value.detach()), {"h": h.grad.numpy(), "w": w.grad.numpy()}


@pytest.mark.parametrize("positions", POSITIONS)
def test_torch_chunked_equals_plain(positions):
    import torch
    import torch.nn.functional as F
    from models.llama_torch import chunked_cross_entropy, cross_entropy
    h, w, y = inputs()
    y = torch.from_numpy(y).long()
    plain = torch_value_and_grads(lambda h, w: cross_entropy(F.linear(h, w), y), h, w)
    chunked = torch_value_and_grads(lambda h, w: chunked_cross_entropy(h, w, y, positions), h, w)
    assert_same(plain, chunked)
    with torch.no_grad():    # without a backward to come: the loss alone
        assert float(chunked_cross_entropy(*(torch.from_numpy(a) for a in inputs()[:2]), y, positions)) == \
            pytest.approx(plain[0], rel=LOSS_RTOL)


# -- through the models: every parameter's gradient, tied and untied --------------------------------------------

def model_tokens(cfg, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)


@pytest.mark.parametrize("tied", list(TIED))
def test_jax_model_loss_chunked_equals_plain(tied):
    import jax
    from models.llama_jax import LlamaForCausalLM, chunked_cross_entropy, cross_entropy, output_weight
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = TIED[tied]
    net, params, tokens = LlamaForCausalLM(cfg), nest(reference_init(cfg, seed=2)), model_tokens(cfg)

    def plain(p):
        return cross_entropy(net.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])

    def chunked(p):
        h = net.apply({"params": p}, tokens[:, :-1], method=LlamaForCausalLM.hidden_states)
        return chunked_cross_entropy(h, output_weight(p, cfg), tokens[:, 1:], 7)

    def run(loss):
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return float(value), {k: np.asarray(v) for k, v in flatten(grads).items()}
    assert_same(run(plain), run(chunked))


@pytest.mark.parametrize("tied", list(TIED))
def test_torch_model_loss_chunked_equals_plain(tied):
    import torch
    from models.llama_torch import LlamaForCausalLM
    cfg = TIED[tied]
    params, tokens = reference_init(cfg, seed=2), torch.from_numpy(model_tokens(cfg)).long()

    def run(loss_chunk):
        model = LlamaForCausalLM(cfg)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
        model.loss_chunk = loss_chunk
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        return float(loss.detach()), {k: p.grad.numpy() for k, p in model.named_parameters()}
    assert_same(run(0), run(7 * B))       # 7 positions of the B rows a chunk


# -- a train step of each backend ------------------------------------------------------------------------------

CFG = SIZES["tiny"]
MICRO, ACCUM, SEQ = 2, 2, 30


def step(framework: str, loss_chunk: int) -> tuple[float, float, float]:
    """(loss, grad_norm, eval loss) of one train step from the reference init, float32."""
    backend = make_backend({"framework": framework}, CFG, OptimizerSpec(), loss_chunk=loss_chunk)
    backend.check_batch(MICRO)
    backend.set_state(HostState.fresh(reference_init(CFG, seed=0)))
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (ACCUM, MICRO, SEQ + 1)).astype(np.int32)
    metrics = backend.train_step(tokens, 1e-3)
    return metrics.loss, metrics.grad_norm, backend.eval_loss(tokens)


@pytest.fixture(scope="module")
def steps():
    """{(framework, loss_chunk): step(...)}: 0 is the whole logits; 16 tokens a chunk are 8 positions of the 2
    rows, which do not divide the 30 positions."""
    return {(fw, chunk): step(fw, chunk) for fw in ("jax", "torch") for chunk in (0, 16)}


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_train_step_with_chunks_equals_without(steps, framework):
    plain, chunked = steps[(framework, 0)], steps[(framework, 16)]
    assert chunked == pytest.approx(plain, rel=LOSS_RTOL), (chunked, plain)


@pytest.mark.slow
def test_frameworks_agree_on_the_chunked_step(steps):
    assert steps[("jax", 16)] == pytest.approx(steps[("torch", 16)], rel=LOSS_RTOL)


def test_a_negative_loss_chunk_is_refused():
    from hal import UserError
    with pytest.raises(UserError, match="trainer.loss_chunk"):
        make_backend({"framework": "jax"}, CFG, OptimizerSpec(), loss_chunk=-1)


# -- FSDP2 over 2 gloo processes: the output weight a sharded DTensor, unsharded inside the root's forward ------------

@pytest.mark.slow
def test_fsdp2_chunked_equals_single_process_plain(tmp_path):
    """Tied embeddings (the embedding's gradient comes from the lookup and the chunked head together); 40 tokens a
    chunk are 10 positions of each process's 4 rows, which do not divide the 64 positions."""
    import json
    import os
    import subprocess
    import sys
    from tests.conftest import ROOT, metrics, train
    common = ["hal=torch", "model=tiny", "model.tie_word_embeddings=true", "trainer.steps=4", "trainer.global_batch=8",
              "trainer.seq_len=64", "trainer.log_every=1", "trainer.eval_every=4", "trainer.checkpoint_every=0",
              "optim.lr=1e-3", "optim.warmup_steps=1"]
    train(tmp_path / "plain", *common, "trainer.loss_chunk=0")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "launch.train", *common, "trainer.loss_chunk=40", f"run_dir={tmp_path / 'fsdp'}"],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    manifest = json.loads((tmp_path / "fsdp" / "checkpoints" / "4" / "manifest.json").read_text())
    assert manifest["writer"]["process_count"] == 2 and manifest["writer"]["mesh"]["fsdp"] == 2
    plain, fsdp = metrics(tmp_path / "plain"), metrics(tmp_path / "fsdp")
    for key in ("loss", "grad_norm", "eval_loss"):
        a, b = ([m[key] for m in ms if key in m] for ms in (fsdp, plain))
        assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=LOSS_RTOL), (key, a, b)
