"""JAX backend: Flax model, Optax AdamW, one jax.jit'ed train step (TPU, GPU, Neuron PJRT, CPU)."""
from __future__ import annotations

import functools

import numpy as np

from hal.base import Backend, HostState, OptimizerSpec, StepMetrics, UserError
from models.spec import LlamaConfig, flatten, nest, param_shapes

# jax.default_backend() names -> trichip platform names
_PLATFORM_OF = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu", "neuron": "neuron"}


def _select_platform(platform: str) -> str:
    import jax
    if platform != "auto":
        want = {"gpu": "cuda,rocm", "cpu": "cpu", "tpu": "tpu", "neuron": "neuron"}.get(platform)
        if want is None:
            raise UserError(f"hal.platform={platform!r} is not one of auto, cpu, gpu, tpu, neuron")
        try:
            jax.config.update("jax_platforms", want)
            jax.devices()
        except RuntimeError as e:
            jax.config.update("jax_platforms", None)
            raise UserError(f"hal.platform={platform} but JAX cannot start it ({str(e).splitlines()[0]}); "
                            f"install the matching jax plugin or use hal.platform=auto") from None
    return _PLATFORM_OF.get(jax.default_backend(), jax.default_backend())


class JaxBackend(Backend):
    framework = "jax"

    def __init__(self, model: LlamaConfig, optim: OptimizerSpec, precision: str = "fp32",
                 platform: str = "auto", remat: bool = False):
        super().__init__(model, optim, precision)
        import jax
        import jax.numpy as jnp
        import optax
        from models.llama_jax import LlamaForCausalLM, cross_entropy

        self.platform = _select_platform(platform)
        self._jax = jax
        dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
        self.net = LlamaForCausalLM(model, dtype=dtype, remat=remat)
        shapes = param_shapes(model)
        self._mask = nest({k: len(s) == 2 for k, s in shapes.items()})
        self.tx = optax.chain(
            optax.clip_by_global_norm(optim.max_grad_norm),
            optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
            optax.add_decayed_weights(optim.weight_decay, mask=self._mask),
        )
        net, tx = self.net, self.tx

        def loss_fn(params, tokens):
            logits = net.apply({"params": params}, tokens[:, :-1])
            return cross_entropy(logits, tokens[:, 1:])

        def train_step(params, opt_state, tokens, lr):
            grad_fn = jax.value_and_grad(loss_fn)
            if tokens.shape[0] == 1:
                loss, grads = grad_fn(params, tokens[0])
            else:
                def micro(acc, tok):
                    loss, grads = grad_fn(params, tok)
                    return jax.tree.map(jnp.add, acc, (loss, grads)), None
                zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
                (loss, grads), _ = jax.lax.scan(micro, zero, tokens)
                loss, grads = jax.tree.map(lambda x: x / tokens.shape[0], (loss, grads))
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
            return params, opt_state, loss, grad_norm

        def eval_loss(params, tokens):
            return jax.lax.map(lambda tok: loss_fn(params, tok), tokens).mean()

        self._train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self._eval_loss = jax.jit(eval_loss)
        self._logits = jax.jit(lambda params, tokens: net.apply({"params": params}, tokens))
        self.params = self.opt_state = None

    def describe(self) -> dict:
        jax = self._jax
        import flax
        import optax
        return {"framework": "jax", "platform": self.platform,
                "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
                "devices": [str(d) for d in jax.devices()], "device_count": jax.device_count(),
                "process_count": jax.process_count(), "precision": self.precision}

    def set_state(self, state: HostState) -> None:
        jax, jnp = self._jax, self._jax.numpy
        self.params = jax.tree.map(jnp.asarray, nest(state.params))
        opt_state = self.tx.init(self.params)
        adam = opt_state[1]._replace(count=jnp.asarray(state.count, jnp.int32),
                                     mu=jax.tree.map(jnp.asarray, nest(state.mu)),
                                     nu=jax.tree.map(jnp.asarray, nest(state.nu)))
        self.opt_state = (opt_state[0], adam, opt_state[2])

    def get_state(self) -> HostState:
        adam = self.opt_state[1]
        host = self._jax.device_get((self.params, adam.mu, adam.nu, adam.count))
        params, mu, nu, count = host
        as_np = functools.partial(np.asarray, dtype=np.float32)
        return HostState(params={k: as_np(v) for k, v in flatten(params).items()},
                         mu={k: as_np(v) for k, v in flatten(mu).items()},
                         nu={k: as_np(v) for k, v in flatten(nu).items()}, count=int(count))

    def train_step(self, tokens: np.ndarray, lr: float) -> StepMetrics:
        self.params, self.opt_state, loss, grad_norm = self._train_step(
            self.params, self.opt_state, tokens, np.float32(lr))
        return StepMetrics(loss=float(loss), grad_norm=float(grad_norm))

    def eval_loss(self, tokens: np.ndarray) -> float:
        return float(self._eval_loss(self.params, tokens))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(self._logits(self.params, np.asarray(tokens, np.int32)))
