"""Document masking: inside a packed window, attention stays within each document and RoPE positions restart.

models.spec.document_segments is the definition (checked by hand here); both frameworks must compute it,
agree with each other and with transformers' LlamaForCausalLM given the same 4-D mask and position ids, and
a document's logits must not depend on its neighbours in the window. Without document_eos nothing changes.
Weights are random at a scale where attention moves the logits well above the tolerances (norm gains too).
"""
import functools

import numpy as np
import pytest

from hal import HostState, OptimizerSpec, make_backend
from models.spec import LlamaConfig, RopeScaling, document_segments, nest
from tests.tolerances import LOSS_RTOL

EOS = 5
ATOL = 1e-5          # logits of one model computed two ways (as tests/test_models.py and tests/test_hf_convert.py)
CONFIGS = {
    "gqa-untied": LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "mqa-tied-llama3": LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                   rope_theta=500000.0, tie_word_embeddings=True,
                                   rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)),
}
SEQ = 40
# EOS positions per row of the packed batch: three documents and a cut-off fourth; one-token documents
# (EOS right after EOS) and an EOS first and last; a row that is one document.
EOS_AT = ([9, 19, 29, 30], [0, 1, 2, 17, SEQ - 1], [])


def random_params(cfg: LlamaConfig, seed: int) -> dict:
    """float32 canonical params: matrices ~ N(0, 0.1), norm gains ~ 1 + N(0, 0.2)."""
    from models.spec import param_shapes
    rng = np.random.default_rng(seed)
    return {k: (1 + 0.2 * rng.standard_normal(s) if len(s) == 1 else 0.1 * rng.standard_normal(s)).astype(np.float32)
            for k, s in param_shapes(cfg).items()}


def packed_batch(cfg: LlamaConfig, seed: int = 0, seq: int = SEQ, eos_at=EOS_AT) -> np.ndarray:
    """int32 [len(eos_at), seq]: random ids other than EOS, with EOS exactly at the given positions."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(EOS + 1, cfg.vocab_size, (len(eos_at), seq)).astype(np.int32)
    for row, where in enumerate(eos_at):
        tokens[row, where] = EOS
    return tokens


@functools.cache
def jax_forward(cfg, document_eos):
    """One jitted forward per (config, document_eos): recompiled per token shape only."""
    import jax
    from models.llama_jax import LlamaForCausalLM
    return jax.jit(LlamaForCausalLM(cfg, document_eos=document_eos).apply)


def jax_logits(cfg, params, tokens, document_eos=EOS):
    return np.asarray(jax_forward(cfg, document_eos)({"params": nest(params)}, tokens))


def torch_model(cfg, params, document_eos=EOS):
    import torch
    from models.llama_torch import LlamaForCausalLM
    model = LlamaForCausalLM(cfg, document_eos)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
    return model.eval()


def torch_logits(cfg, params, tokens, document_eos=EOS):
    import torch
    with torch.no_grad():
        return torch_model(cfg, params, document_eos)(torch.from_numpy(tokens).long()).numpy()


def logits(framework, cfg, params, tokens, document_eos=EOS):
    return (jax_logits if framework == "jax" else torch_logits)(cfg, params, tokens, document_eos)


# -- (a) the definition -------------------------------------------------------------------------------

def test_document_segments_by_hand():
    seg, pos = document_segments(np.array([[4, 1, 3, 1, 1, 7, 8]]), eos_id=1)
    np.testing.assert_array_equal(seg, [[0, 0, 1, 1, 2, 3, 3]])      # the EOS closes its own document
    np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 0, 0, 1]])
    seg, pos = document_segments(np.array([1, 2, 3, 1]), eos_id=1)   # EOS first: a one-token document
    np.testing.assert_array_equal(seg, [0, 1, 1, 1])
    np.testing.assert_array_equal(pos, [0, 0, 1, 2])
    seg, pos = document_segments(np.array([[2, 3, 4], [9, 9, 9]]), eos_id=1)   # no EOS: one document
    np.testing.assert_array_equal(seg, np.zeros((2, 3)))
    np.testing.assert_array_equal(pos, [[0, 1, 2], [0, 1, 2]])
    assert seg.dtype == pos.dtype == np.int32 and seg.shape == pos.shape == (2, 3)


def test_frameworks_compute_the_same_segments():
    import jax
    import torch
    from models import llama_jax, llama_torch
    tokens = np.random.default_rng(1).integers(0, 4, (5, 64)).astype(np.int32)   # EOS id 1: a quarter of tokens
    seg, pos = document_segments(tokens, 1)
    assert seg.max() > 5
    for got in (jax.jit(llama_jax.document_segments, static_argnums=1)(tokens, 1),
                llama_torch.document_segments(torch.from_numpy(tokens).long(), 1)):
        np.testing.assert_array_equal(np.asarray(got[0]), seg)
        np.testing.assert_array_equal(np.asarray(got[1]), pos)


# -- (b) JAX against torch, (c) both against transformers --------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_jax_and_torch_agree_on_a_packed_batch(name):
    cfg = CONFIGS[name]
    params, tokens = random_params(cfg, 3), packed_batch(cfg)
    lj, lt = jax_logits(cfg, params, tokens), torch_logits(cfg, params, tokens)
    unmasked = jax_logits(cfg, params, tokens, document_eos=None)
    print(f"{name}: max |jax - torch| {np.abs(lj - lt).max():.1e} (bound {ATOL:.0e}); "
          f"the mask moves logits by {np.abs(lj - unmasked).max():.2f}")
    assert np.abs(lj - unmasked).max() > 1000 * ATOL        # the mask matters on this batch
    assert np.abs(lj - lt).max() <= ATOL


def hf_4d_mask(tokens: np.ndarray):
    """transformers' custom 4-D additive mask [B, 1, T, T] and position ids [B, T] from document_segments."""
    import torch
    seg, pos = document_segments(tokens, EOS)
    t = tokens.shape[1]
    allowed = (seg[:, :, None] == seg[:, None, :]) & np.tri(t, dtype=bool)
    mask = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    return torch.from_numpy(mask), torch.from_numpy(pos.astype(np.int64))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_frameworks_match_transformers_given_the_same_mask(name):
    import torch
    import transformers
    from models import hf
    cfg = CONFIGS[name]
    params, tokens = random_params(cfg, 4), packed_batch(cfg, seed=1)
    config = transformers.LlamaConfig(**hf.config_to_hf(cfg))
    config._attn_implementation = "eager"            # the additive mask added to the scores, no fused kernel
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=not cfg.tie_word_embeddings)
    mask, positions = hf_4d_mask(tokens)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens).long(), attention_mask=mask, position_ids=positions).logits.numpy()
        plain = model(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(expected - plain).max() > 1000 * ATOL
    for framework in ("jax", "torch"):
        got = logits(framework, cfg, params, tokens)
        print(f"{name} {framework}: max |trichip - transformers| {np.abs(got - expected).max():.1e} (bound {ATOL:.0e})")
        assert np.abs(got - expected).max() <= ATOL, framework


# -- (d) isolation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_document_in_a_packed_window_is_computed_as_if_alone(framework):
    cfg = CONFIGS["gqa-untied"]
    params, tokens = random_params(cfg, 5), packed_batch(cfg, seed=2)
    packed = logits(framework, cfg, params, tokens)
    bounds = [0, *(p + 1 for p in EOS_AT[0]), SEQ]          # row 0: documents [0, 10), [10, 20), ... [30, 31), ...
    gaps = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        alone = logits(framework, cfg, params, tokens[:1, start:end])
        gaps.append(float(np.abs(packed[0, start:end] - alone[0]).max()))
    print(f"{framework}: max |packed - alone| per document {['%.1e' % g for g in gaps]} (bound {ATOL:.0e})")
    assert max(gaps) <= ATOL
    # without the mask the later documents see the earlier ones
    unmasked = logits(framework, cfg, params, tokens, document_eos=None)
    assert np.abs(unmasked[0, bounds[1]:bounds[2]] - packed[0, bounds[1]:bounds[2]]).max() > 1000 * ATOL


# -- (e) without document_eos nothing is added ---------------------------------------------------------

def test_without_document_eos_the_jax_program_has_no_mask():
    import jax
    from models.llama_jax import LlamaForCausalLM
    cfg = CONFIGS["gqa-untied"]
    params, tokens = random_params(cfg, 6), packed_batch(cfg)

    def program(document_eos):
        net = LlamaForCausalLM(cfg, document_eos=document_eos)
        return str(jax.make_jaxpr(net.apply)({"params": nest(params)}, tokens))
    assert "cumsum" in program(EOS) and "cummax" in program(EOS)
    assert "cumsum" not in program(None) and "cummax" not in program(None)
    # a window without EOS is one document: the masked model computes the plain model's logits
    no_eos = packed_batch(cfg, eos_at=([], []))
    np.testing.assert_array_equal(jax_logits(cfg, params, no_eos), jax_logits(cfg, params, no_eos, document_eos=None))


def test_without_document_eos_torch_calls_causal_sdpa_without_a_mask():
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    cfg = CONFIGS["gqa-untied"]
    params, tokens = random_params(cfg, 6), packed_batch(cfg)

    class SdpaCalls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                self.calls.append((kwargs.get("is_causal", False), kwargs.get("attn_mask")))
            return func(*args, **kwargs)

    for document_eos in (None, EOS):
        with SdpaCalls() as seen, torch.no_grad():
            torch_model(cfg, params, document_eos)(torch.from_numpy(tokens).long())
        assert len(seen.calls) == cfg.num_hidden_layers
        if document_eos is None:
            assert all(causal and mask is None for causal, mask in seen.calls)
        else:
            assert all(not causal and mask.shape == (3, 1, SEQ, SEQ) for causal, mask in seen.calls)
    no_eos = packed_batch(cfg, eos_at=([], []))
    np.testing.assert_allclose(torch_logits(cfg, params, no_eos), torch_logits(cfg, params, no_eos, None),
                               rtol=0, atol=ATOL)


# -- (f) training through the backends -------------------------------------------------------------------

def make(framework: str, cfg: LlamaConfig, params: dict, remat: bool = False, hal: dict | None = None):
    backend = make_backend(dict(hal or {}, framework=framework), cfg, OptimizerSpec(), remat=remat, document_eos=EOS)
    backend.check_batch(3)                       # as the trainer does before the first step
    backend.set_state(HostState.fresh(params))
    return backend


def train_losses(backend, batches: np.ndarray) -> np.ndarray:
    """Losses of len(batches) train steps, then the eval loss of the first batch."""
    return np.array([*(backend.train_step(b, lr=3e-3).loss for b in batches), backend.eval_loss(batches[0])])


def step_batches(cfg: LlamaConfig, steps: int = 3, accum: int = 2) -> np.ndarray:
    """int32 [steps, accum, 3, 33]: packed windows of seq_len + 1 tokens, EOS at varied places."""
    return np.stack([np.stack([packed_batch(cfg, seed=10 * s + a, seq=33, eos_at=([4, 11, 12], [0, 20], [32]))
                               for a in range(accum)]) for s in range(steps)])


def rel_gap(a, b):
    return float((np.abs(a - b) / np.abs(b)).max())


def first_loss(cfg, params, rows, document_eos):
    """Mean next-token cross-entropy of rows [N, T + 1] under models.llama_torch, outside any backend."""
    import torch
    from models.llama_torch import cross_entropy
    with torch.no_grad():
        t = torch.from_numpy(rows).long()
        return float(cross_entropy(torch_model(cfg, params, document_eos)(t[:, :-1]), t[:, 1:]))


@pytest.mark.slow
def test_train_steps_agree_across_frameworks():
    """Train steps (two micro-batches each), eval loss and logits through make_backend(document_eos=)."""
    cfg = CONFIGS["gqa-untied"]
    params, batches = random_params(cfg, 7), step_batches(cfg)
    jax_backend, torch_backend = make("jax", cfg, params), make("torch", cfg, params)
    j, t = train_losses(jax_backend, batches), train_losses(torch_backend, batches)
    print(f"train+eval losses jax {j}, max rel gap to torch {rel_gap(j, t):.1e} (bound {LOSS_RTOL:.0e})")
    assert rel_gap(j, t) <= LOSS_RTOL
    assert j[-2] < j[0]                                           # it trained
    # the mask is in the step: its first loss is the masked model's, not the plain one's
    rows = batches[0].reshape(-1, batches.shape[-1])
    masked, plain = (first_loss(cfg, params, rows, document_eos) for document_eos in (EOS, None))
    assert abs(masked - j[0]) <= LOSS_RTOL * j[0] < abs(plain - j[0]) / 100
    window = batches[0, 0, :, :-1]
    assert np.abs(jax_backend.logits(window) - torch_backend.logits(window)).max() <= ATOL


@pytest.mark.slow
def test_remat_keeps_the_mask():
    """Activation checkpointing (nn.remat on JAX, torch.utils.checkpoint on torch) against torch without it."""
    cfg = CONFIGS["mqa-tied-llama3"]
    params, batches = random_params(cfg, 8), step_batches(cfg, steps=2, accum=1)
    ref = train_losses(make("torch", cfg, params), batches)
    for framework in ("jax", "torch"):
        remat = train_losses(make(framework, cfg, params, remat=True), batches)
        print(f"{framework} remat against torch without, max rel gap {rel_gap(remat, ref):.1e} "
              f"(bound {LOSS_RTOL:.0e})")
        assert rel_gap(remat, ref) <= LOSS_RTOL


@pytest.mark.slow
def test_torch_compiled_blocks_keep_the_mask():
    """hal.compile=true compiles each block with the boolean mask as an input (inductor on the CPU)."""
    cfg = CONFIGS["gqa-untied"]
    params, batches = random_params(cfg, 9), step_batches(cfg, steps=2, accum=1)
    ref = train_losses(make("torch", cfg, params), batches)
    compiled = train_losses(make("torch", cfg, params, hal={"compile": True}), batches)
    print(f"compiled blocks against eager, max rel gap {rel_gap(compiled, ref):.1e} (bound {LOSS_RTOL:.0e})")
    assert rel_gap(compiled, ref) <= LOSS_RTOL


@pytest.mark.slow
def test_torch_flex_attention_block_mask_on_the_cpu():
    """The flex_attention path the torch backend takes on CUDA, run forward here on the CPU (compiled by
    inductor; flex_attention has no CPU backward): the logits of SDPA with the boolean mask, and a batch
    with other documents reuses the compiled graph."""
    import torch
    from torch._dynamo.utils import counters
    cfg = CONFIGS["mqa-tied-llama3"]
    params = random_params(cfg, 10)
    model = torch_model(cfg, params)
    model.flex_attention = True
    graphs = []
    for seed, eos_at in ((3, EOS_AT), (4, ([2, 3, 30], [SEQ - 2], [9]))):
        tokens = packed_batch(cfg, seed=seed, eos_at=eos_at)
        with torch.no_grad():
            got = model(torch.from_numpy(tokens).long()).numpy()
        graphs.append(int(counters["stats"]["unique_graphs"]))
        expected = torch_logits(cfg, params, tokens)
        print(f"flex against SDPA: max |logits gap| {np.abs(got - expected).max():.1e} (bound {ATOL:.0e})")
        assert np.abs(got - expected).max() <= ATOL
    assert graphs[0] >= 1 and graphs[1] == graphs[0]
