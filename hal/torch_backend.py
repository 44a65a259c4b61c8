"""PyTorch backend: the same Llama in torch, torch.optim.AdamW with two param groups (GPU, Neuron, CPU)."""
from __future__ import annotations

import contextlib

import numpy as np

from hal.base import Backend, HostState, OptimizerSpec, StepMetrics, UserError
from models.spec import LlamaConfig, decays


def _select_device(platform: str):
    import torch
    if platform == "auto":
        platform = "gpu" if torch.cuda.is_available() else "cpu"
    if platform == "cpu":
        return "cpu", torch.device("cpu")
    if platform == "gpu":
        if not torch.cuda.is_available():
            raise UserError("hal.platform=gpu but torch sees no CUDA device (torch.cuda.is_available() is False); "
                            "install a CUDA build of torch or use hal.platform=cpu")
        return "gpu", torch.device("cuda", torch.cuda.current_device())
    raise UserError(f"hal.platform={platform!r} is not one of auto, cpu, gpu for hal=torch")


class TorchBackend(Backend):
    framework = "torch"

    def __init__(self, model: LlamaConfig, optim: OptimizerSpec, precision: str = "fp32",
                 platform: str = "auto", remat: bool = False, mesh: dict | None = None,
                 mesh_rule: str = "auto", instance_type: str | None = None):
        super().__init__(model, optim, precision)
        import torch
        from models.llama_torch import LlamaForCausalLM, cross_entropy

        self._torch = torch
        self.platform, self.device = _select_device(platform)
        with torch.device("meta"):
            net = LlamaForCausalLM(model)
        self.net = net.to_empty(device=self.device)
        self.net.activation_checkpointing = remat
        self._cross_entropy = cross_entropy
        named = dict(self.net.named_parameters())
        decay = [p for n, p in named.items() if decays(n, tuple(p.shape))]
        no_decay = [p for n, p in named.items() if not decays(n, tuple(p.shape))]
        # lr is set before every step from the trainer's schedule; 0.0 here is never used.
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.0, betas=(optim.b1, optim.b2), eps=optim.eps)
        self._names = list(named)

    def _autocast(self):
        if self.precision == "bf16":
            return self._torch.autocast(device_type=self.device.type, dtype=self._torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> dict:
        torch = self._torch
        devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                   if self.platform == "gpu" else [f"cpu ({torch.get_num_threads()} threads)"])
        return {"framework": "torch", "platform": self.platform, "versions": {"torch": torch.__version__},
                "devices": devices, "device_count": len(devices), "process_count": 1,
                "precision": self.precision}

    def set_state(self, state: HostState) -> None:
        torch = self._torch
        missing = set(self._names) ^ set(state.params)
        if missing:
            raise UserError(f"state does not match the model: parameters {sorted(missing)[:3]} differ")
        named = dict(self.net.named_parameters())
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(torch.from_numpy(np.ascontiguousarray(state.params[name])))
        self.opt.state.clear()
        if state.count > 0:
            for name, p in named.items():
                self.opt.state[p] = {
                    "step": torch.tensor(float(state.count), dtype=torch.float32),
                    "exp_avg": torch.from_numpy(np.array(state.mu[name], np.float32)).to(self.device),
                    "exp_avg_sq": torch.from_numpy(np.array(state.nu[name], np.float32)).to(self.device),
                }

    def get_state(self) -> HostState:
        named = dict(self.net.named_parameters())
        params = {n: p.detach().cpu().numpy().copy() for n, p in named.items()}
        mu, nu, count = {}, {}, 0
        for n, p in named.items():
            st = self.opt.state.get(p)
            if st:
                mu[n] = st["exp_avg"].cpu().numpy().copy()
                nu[n] = st["exp_avg_sq"].cpu().numpy().copy()
                count = int(st["step"])
            else:
                mu[n] = np.zeros_like(params[n])
                nu[n] = np.zeros_like(params[n])
        return HostState(params=params, mu=mu, nu=nu, count=count)

    def _loss(self, tokens):
        with self._autocast():
            logits = self.net(tokens[:, :-1])
        return self._cross_entropy(logits, tokens[:, 1:])

    def train_step(self, tokens: np.ndarray, lr: float) -> StepMetrics:
        torch = self._torch
        self.net.train()
        batch = torch.from_numpy(np.asarray(tokens, np.int64)).to(self.device)
        accum = batch.shape[0]
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in batch:
            loss = self._loss(micro)
            (loss / accum).backward()
            total += loss.detach()
        params = [p for p in self.net.parameters()]
        grads = [p.grad for p in params]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # Clip as optax.clip_by_global_norm does: g / norm * max_norm when norm exceeds max_norm.
        if grad_norm > self.optim.max_grad_norm:
            torch._foreach_div_(grads, grad_norm)
            torch._foreach_mul_(grads, self.optim.max_grad_norm)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        return StepMetrics(loss=float(total / accum), grad_norm=float(grad_norm))

    def eval_loss(self, tokens: np.ndarray) -> float:
        torch = self._torch
        self.net.eval()
        with torch.no_grad():
            batch = torch.from_numpy(np.asarray(tokens, np.int64)).to(self.device)
            return float(torch.stack([self._loss(micro) for micro in batch]).mean())

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        torch = self._torch
        self.net.eval()
        with torch.no_grad(), self._autocast():
            out = self.net(torch.from_numpy(np.asarray(tokens, np.int64)).to(self.device))
        return out.float().cpu().numpy()
