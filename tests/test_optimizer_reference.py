"""The documented optimizer and learning-rate schedule, written again in NumPy from their definitions
(README "One canonical state", hal.base.OptimizerSpec, trainer.schedule's docstring), and each
backend's update checked against it.

One update of a backend is checked from a state set through HostState (fresh, or with nonzero moments
and count) on a known gradient: the backend's own gradient of the mean loss over the global batch
(read from a probe update, see backend_gradient), checked against torch autograd's on models.llama_torch
over all rows at once (GRADIENT_RTOL). Per element, |delta_backend - delta_reference| <=
OPTIMIZER_RTOL * (the size of the terms the update sums) plus two float32 roundings of the parameter.
The reference uses none of hal/, trainer.schedule or models.spec.decays.
"""
import dataclasses
import functools
import math

import numpy as np
import pytest

from hal import HostState, OptimizerSpec, make_backend
from models.spec import LlamaConfig, reference_init
from tests.tolerances import GRADIENT_RTOL, OPTIMIZER_RTOL

CFG = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
SEQ, MICRO, ACCUM = 16, 2, 2
LR = 1e-2
FRAMEWORKS = ("jax", "torch")


# -- the reference ----------------------------------------------------------------------------------

def reference_update(state: HostState, grads: dict, lr: float, spec: OptimizerSpec) -> tuple[HostState, dict]:
    """One AdamW update as documented, in float64: global-norm clipping, bias correction with t = count + 1,
    eps outside the square root, decoupled weight decay on 2-D weights only.

    Also returns, per element, the size of the terms the update sums (each taken positive):
    lr * ((b1 |mu| + (1 - b1) |g|) / (1 - b1^t) / (sqrt(v_hat) + eps) + wd |p|). Float32 arithmetic errs
    in proportion to it, also where the terms cancel."""
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    norm = math.sqrt(sum(float((v * v).sum()) for v in g.values()))
    if norm > spec.max_grad_norm:
        g = {k: v / norm * spec.max_grad_norm for k, v in g.items()}
    t = state.count + 1
    params, mu, nu, size = {}, {}, {}, {}
    for k, p in state.params.items():
        p, wd = np.asarray(p, np.float64), (spec.weight_decay if p.ndim == 2 else 0.0)
        mu[k] = spec.b1 * state.mu[k] + (1 - spec.b1) * g[k]
        nu[k] = spec.b2 * state.nu[k] + (1 - spec.b2) * g[k] ** 2
        denom = (1 - spec.b1 ** t) * (np.sqrt(nu[k] / (1 - spec.b2 ** t)) + spec.eps)
        params[k] = p - lr * (mu[k] / denom + wd * p)
        size[k] = lr * ((spec.b1 * np.abs(state.mu[k]) + (1 - spec.b1) * np.abs(g[k])) / denom + wd * np.abs(p))
    return HostState(params=params, mu=mu, nu=nu, count=t), size


def reference_lr(count: int, peak: float, warmup: int, total: int, min_ratio: float, schedule: str) -> float:
    """README: linear warmup where the first update (count 0) already gets peak / warmup, then cosine, linear
    or constant from peak down to min_ratio * peak, reached at update `total` and held after it."""
    if count < warmup:
        return peak * (count + 1) / warmup
    floor = min_ratio * peak
    frac = min(1.0, (count - warmup) / max(1, total - warmup))
    return {"constant": peak,
            "linear": peak + (floor - peak) * frac,
            "cosine": floor + (peak - floor) * (math.cos(math.pi * frac) + 1) / 2}[schedule]


# -- gradients ------------------------------------------------------------------------------------

def autograd_gradient(params: dict, tokens: np.ndarray) -> tuple[float, dict]:
    """Mean loss over every target token of tokens [B, T + 1] and its gradient, by torch autograd on
    models.llama_torch, outside any backend: the independent gradient."""
    import torch
    from models.llama_torch import LlamaForCausalLM, cross_entropy
    model = LlamaForCausalLM(CFG)
    model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in params.items()}, strict=True)
    t = torch.from_numpy(tokens).long()
    loss = cross_entropy(model(t[:, :-1]), t[:, 1:])
    loss.backward()
    return float(loss.detach()), {k: p.grad.numpy().copy() for k, p in model.named_parameters()}


@functools.cache
def backend(framework: str, spec: tuple):
    """One backend per (framework, OptimizerSpec fields): JAX compiles its step once per spec."""
    return make_backend({"framework": framework}, CFG, OptimizerSpec(*spec))


def one_step(framework: str, spec: OptimizerSpec, state: HostState, tokens: np.ndarray, lr: float = LR):
    """The backend's update of `state` on `tokens` at `lr`: (metrics, state after)."""
    b = backend(framework, dataclasses.astuple(spec))
    b.set_state(state)
    metrics = b.train_step(tokens, lr)
    return metrics, b.get_state()


def backend_gradient(framework: str, params: dict, tokens: np.ndarray) -> dict:
    """The gradient the backend computes for `params` on `tokens`, read exactly from its first moment after
    one update from zero moments with b1 = 0 and nothing clipped (m = b1 * 0 + (1 - b1) * g = g).

    The reference is fed this gradient, not the autograd one: float32 sums in another order move an element
    of |g| ~ 1e-7 by ~1e-11, which Adam at eps 1e-8 turns into ~5e-5 lr of update. That it is the gradient
    is checked against autograd_gradient at GRADIENT_RTOL."""
    _, after = one_step(framework, OptimizerSpec(b1=0.0, max_grad_norm=1e30), HostState.fresh(params), tokens)
    return after.mu


def gradient_gap(g: dict, ref: dict) -> float:
    """max over tensors of max |g - g_ref| / max |g_ref|."""
    return max(float(np.abs(g[k] - r).max() / np.abs(r).max()) for k, r in ref.items())


def global_norm(g: dict) -> float:
    return math.sqrt(sum(float((np.asarray(v, np.float64) ** 2).sum()) for v in g.values()))


# -- states and batches ----------------------------------------------------------------------------

def batch(seed: int = 0) -> np.ndarray:
    """int32 [ACCUM, MICRO, SEQ + 1]; ids below 50 only, so the last embedding rows get no gradient."""
    return np.random.default_rng(seed).integers(0, 50, (ACCUM, MICRO, SEQ + 1)).astype(np.int32)


def later_state(count: int = 7, seed: int = 1) -> HostState:
    """A state some updates in: moved params, nonzero first and second moments of a gradient's scale."""
    params = reference_init(CFG, seed=seed)
    _, g = autograd_gradient(params, batch(seed).reshape(-1, SEQ + 1))
    rng = np.random.default_rng(seed)
    mu, nu = {}, {}
    for k, p in params.items():
        scale = float(np.abs(g[k]).mean())
        params[k] = (p + 0.01 * rng.standard_normal(p.shape)).astype(np.float32)
        mu[k] = (scale * rng.standard_normal(p.shape)).astype(np.float32)
        nu[k] = ((scale * rng.standard_normal(p.shape)) ** 2 + scale ** 2 / 4).astype(np.float32)
    return HostState(params=params, mu=mu, nu=nu, count=count)


def fresh_state(seed: int = 1) -> HostState:
    return HostState.fresh(reference_init(CFG, seed=seed))


def update_error(before: HostState, after: HostState, ref: HostState, size: dict) -> float:
    """max over elements of |delta - delta_ref|, less two float32 roundings of the parameter (torch's AdamW
    decays it, then adds the Adam step), relative to the size of the update's terms."""
    worst = -np.inf
    for k, r in ref.params.items():
        p0 = np.asarray(before.params[k], np.float64)
        err = np.abs((after.params[k] - p0) - (r - p0)) - 2 * np.spacing(np.abs(r).astype(np.float32))
        worst = max(worst, float((err / np.maximum(size[k], 1e-30)).max()))
    return worst


def moment_error(after: HostState, ref: HostState) -> float:
    """max over tensors of max |m - m_ref| / max |m_ref|, for both moments."""
    return max(gradient_gap(after.mu, ref.mu), gradient_gap(after.nu, ref.nu))


def check_update(framework: str, spec: OptimizerSpec, state: HostState, tokens: np.ndarray, lr: float = LR) -> float:
    """The backend's update against the reference from the same state and gradient; returns the gradient's norm."""
    loss, independent = autograd_gradient(state.params, tokens.reshape(-1, tokens.shape[-1]))
    g = backend_gradient(framework, state.params, tokens)
    ref, size = reference_update(state, g, lr, spec)
    metrics, after = one_step(framework, spec, state, tokens, lr)
    norm, ggap = global_norm(g), gradient_gap(g, independent)
    err, merr = update_error(state, after, ref, size), moment_error(after, ref)
    print(f"{framework} {spec}: update {err:.1e}, moments {merr:.1e}, gradient {ggap:.1e} from autograd, "
          f"grad_norm {metrics.grad_norm:.6g} (autograd {global_norm(independent):.6g})")
    assert ggap <= GRADIENT_RTOL, f"{framework}: gradient off autograd's by {ggap:.2e} of its scale"
    assert metrics.loss == pytest.approx(loss, rel=GRADIENT_RTOL)
    assert metrics.grad_norm == pytest.approx(norm, rel=OPTIMIZER_RTOL)
    assert after.count == state.count + 1
    assert err <= OPTIMIZER_RTOL, f"{framework}: update off the reference by {err:.2e} of its size"
    assert merr <= OPTIMIZER_RTOL, f"{framework}: moments off the reference by {merr:.2e}"
    return norm


# -- the tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_first_update_bias_corrected_without_clipping(framework):
    """Step 1 from a fresh state: t = 1 bias correction; a max_grad_norm far above the norm clips nothing."""
    check_update(framework, OptimizerSpec(max_grad_norm=1e6), fresh_state(), batch())


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_later_update_with_and_without_clipping(framework):
    """Step 8 from a set state (count 7, nonzero moments), where the gradient's scale matters: once with the
    norm under max_grad_norm, once with it 1.5x over (so g is scaled to the max_grad_norm; under twice the
    threshold, so that clipping only past 2 * max_grad_norm would show)."""
    state = later_state()
    norm = check_update(framework, OptimizerSpec(max_grad_norm=1e6), state, batch(2))
    check_update(framework, OptimizerSpec(max_grad_norm=norm / 1.5), state, batch(2))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_eps_sits_outside_the_square_root(framework):
    """An eps of the gradient's own scale makes its place visible: sqrt(v) + eps, not sqrt(v + eps)."""
    state = later_state()
    scale = float(np.sqrt(np.mean([v.mean() for v in state.nu.values()])))
    check_update(framework, OptimizerSpec(eps=scale, max_grad_norm=1e6), state, batch(3))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_weight_decay_is_decoupled_and_on_2d_weights_only(framework):
    """The same update with and without weight decay differs by exactly lr * wd * p on 2-D weights and
    not at all on norm gains (1-D) — whatever the gradient."""
    state, tokens, wd = later_state(), batch(4), 0.5
    _, plain = one_step(framework, OptimizerSpec(weight_decay=0.0), state, tokens)
    _, decayed = one_step(framework, OptimizerSpec(weight_decay=wd), state, tokens)
    for k, p in state.params.items():
        shift = plain.params[k].astype(np.float64) - decayed.params[k]
        want = LR * wd * p.astype(np.float64) if p.ndim == 2 else np.zeros(p.shape)
        size = np.abs(plain.params[k] - p.astype(np.float64)) + np.abs(want)
        slack = OPTIMIZER_RTOL * size + 2 * np.spacing(np.abs(p))
        assert (np.abs(shift - want) <= slack).all(), f"{framework}: {k} decayed wrongly"
    assert any(p.ndim == 1 for p in state.params.values()) and any(p.ndim == 2 for p in state.params.values())


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_accumulated_micro_batches_equal_one_full_batch(framework):
    """[ACCUM, MICRO, T] accumulated: the mean gradient over all ACCUM * MICRO rows (as autograd computes it on
    them at once, and as the backend computes it on [1, ACCUM * MICRO, T]), and the reference update on it."""
    state, tokens = later_state(), batch(5)
    _, independent = autograd_gradient(state.params, tokens.reshape(-1, SEQ + 1))
    accumulated = backend_gradient(framework, state.params, tokens)
    whole = backend_gradient(framework, state.params, tokens.reshape(1, ACCUM * MICRO, SEQ + 1))
    gaps = gradient_gap(accumulated, independent), gradient_gap(accumulated, whole)
    print(f"{framework}: accumulated gradient {gaps[0]:.1e} from autograd, {gaps[1]:.1e} from one micro-batch")
    assert max(gaps) <= GRADIENT_RTOL
    check_update(framework, OptimizerSpec(max_grad_norm=1e6), state, tokens)


SCHEDULES = [dict(peak=1e-3, warmup=10, total=110, min_ratio=0.1, schedule=s) for s in ("cosine", "linear", "constant")]
SCHEDULES += [dict(peak=3e-3, warmup=1, total=7, min_ratio=0.0, schedule="cosine"),
              dict(peak=3e-3, warmup=0, total=50, min_ratio=0.5, schedule="linear")]


@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: f"{kw['schedule']}-warmup{kw['warmup']}")
def test_schedule_is_the_documented_formula(kw, tmp_path):
    """The trainer's learning rate for update `count` (the loop's step index), as a run configured by
    Hydra overrides computes it, against the README formula, through warmup, decay and beyond the end."""
    from tests.conftest import compose
    from trainer.loop import Run
    overrides = [f"optim.lr={kw['peak']}", f"optim.warmup_steps={kw['warmup']}", f"trainer.steps={kw['total']}",
                 f"optim.min_lr_ratio={kw['min_ratio']}", f"optim.schedule={kw['schedule']}"]
    run = Run(compose(overrides), tmp_path / "run")
    for count in range(kw["total"] + 5):
        assert run.lr(count) == pytest.approx(reference_lr(count, **kw), rel=1e-12, abs=1e-15), count
    if kw["warmup"]:
        assert run.lr(0) == pytest.approx(kw["peak"] / kw["warmup"], rel=1e-12)     # the first update moves
