"""The hand-written loops table 3a measures trichip's step against: the same model, data, batch and
precision in plain PyTorch and plain JAX/optax."""
from __future__ import annotations

import contextlib

import numpy as np

import hal
from bench.sections.common import PEAK_LR, WARMUP
from models.spec import nest, reference_init


class HandTorch:
    """A plain PyTorch loop: the model, torch.optim.AdamW with the same two param groups, clip, step."""

    def __init__(self, cfg, precision: str, optim: hal.OptimizerSpec):
        import torch
        from models.llama_torch import LlamaForCausalLM
        self.torch, self.precision, self.optim = torch, precision, optim
        self.net = LlamaForCausalLM(cfg)
        self.net.load_state_dict({k: torch.from_numpy(v) for k, v in reference_init(cfg, 0).items()})
        self.net.train()
        named = dict(self.net.named_parameters())
        self.params = list(named.values())
        self.opt = torch.optim.AdamW(
            [{"params": [p for p in self.params if p.ndim == 2], "weight_decay": optim.weight_decay},
             {"params": [p for p in self.params if p.ndim != 2], "weight_decay": 0.0}],
            lr=0.0, betas=(optim.b1, optim.b2), eps=optim.eps)

    def step(self, tokens: np.ndarray, lr: float) -> float:
        torch = self.torch
        import torch.nn.functional as F
        batch = torch.from_numpy(tokens).long()
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in batch:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
            with ctx:
                logits = self.net(micro[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten())
            (loss / batch.shape[0]).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, self.optim.max_grad_norm)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        return total / batch.shape[0]


class HandJax:
    """A plain JAX loop: the Flax model, optax clip + adamw (schedule inside), one jax.jit with donation."""

    def __init__(self, cfg, precision: str, optim: hal.OptimizerSpec, total_steps: int):
        import jax
        import jax.numpy as jnp
        import optax
        from models.llama_jax import LlamaForCausalLM, cross_entropy
        self.jax = jax
        net = LlamaForCausalLM(cfg, dtype=jnp.bfloat16 if precision == "bf16" else jnp.float32)
        init = reference_init(cfg, 0)
        self.params = nest({k: jnp.asarray(v) for k, v in init.items()})
        mask = nest({k: v.ndim == 2 for k, v in init.items()})
        schedule = optax.warmup_cosine_decay_schedule(0.0, PEAK_LR, WARMUP, max(total_steps, WARMUP + 1),
                                                      PEAK_LR * 0.1)
        tx = optax.chain(optax.clip_by_global_norm(optim.max_grad_norm),
                         optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                     weight_decay=optim.weight_decay, mask=mask))
        self.opt_state = tx.init(self.params)

        def loss_fn(params, tok):
            return cross_entropy(net.apply({"params": params}, tok[:, :-1]), tok[:, 1:])

        def step(params, opt_state, tokens):
            if tokens.shape[0] == 1:
                loss, grads = jax.value_and_grad(loss_fn)(params, tokens[0])
            else:
                def micro(acc, tok):
                    return jax.tree.map(jnp.add, acc, jax.value_and_grad(loss_fn)(params, tok)), None
                zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
                (loss, grads), _ = jax.lax.scan(micro, zero, tokens)
                loss, grads = jax.tree.map(lambda x: x / tokens.shape[0], (loss, grads))
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = jax.jit(step, donate_argnums=(0, 1))

    def step(self, tokens: np.ndarray, lr: float) -> float:
        self.params, self.opt_state, loss = self._step(self.params, self.opt_state, self.jax.numpy.asarray(tokens))
        return float(loss)
