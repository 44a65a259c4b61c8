"""Text from a model: decoding with a KV cache on either framework (models.llama_jax.generate,
models.llama_torch.generate), from canonical host params or from a backend's live train state.

Tokens are decoded in float32 whatever the training precision. Greedy decoding (temperature 0) is the
argmax at each step; with a temperature, draws are reproducible per framework for a given seed.
"""
from __future__ import annotations

import numpy as np

from hal.base import Backend, UserError
from models.spec import LlamaConfig, nest


def check_request(cfg: LlamaConfig, prompt: np.ndarray, max_new_tokens: int, temperature: float, top_k: int) -> None:
    """One-line errors for a request the model cannot serve."""
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise UserError("the prompt must hold at least one token")
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise UserError(f"the prompt has token ids outside the model's vocabulary [0, {cfg.vocab_size})")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if prompt.shape[1] + max_new_tokens > cfg.max_position_embeddings:
        raise UserError(f"prompt ({prompt.shape[1]} tokens) + max new tokens ({max_new_tokens}) exceeds the model's "
                        f"max_position_embeddings ({cfg.max_position_embeddings}); ask for fewer tokens")
    if temperature < 0 or top_k < 0:
        raise UserError(f"temperature and top-k must be >= 0, got {temperature} and {top_k}")


def generate(framework: str, cfg: LlamaConfig, params: dict[str, np.ndarray], prompt: np.ndarray,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> np.ndarray:
    """int32 [B, max_new_tokens] continuing int32 prompt [B, P], from canonical params on one framework (JAX on
    its default device; torch on the GPU when there is one)."""
    prompt = np.asarray(prompt, np.int32)
    check_request(cfg, prompt, max_new_tokens, temperature, top_k)
    if framework == "jax":
        from models import llama_jax
        out = llama_jax.generate(nest(params), cfg, prompt, max_new_tokens, temperature, top_k, seed)
        return np.asarray(out, np.int32)
    if framework == "torch":
        import torch
        net = _torch_model(cfg, params, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return _torch_generate(net, prompt, max_new_tokens, temperature, top_k, seed)
    raise UserError(f"unknown framework {framework!r}: use jax or torch")


def generate_live(backend: Backend, prompt: np.ndarray, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int = 0, seed: int = 0) -> np.ndarray:
    """generate() from the backend's current params, on its devices. Every process must call it (the
    params are sharded); each gets the same tokens."""
    prompt = np.asarray(prompt, np.int32)
    check_request(backend.model, prompt, max_new_tokens, temperature, top_k)
    if backend.framework == "jax":
        from models import llama_jax
        tokens = backend._put(prompt, backend.replicated) if backend.process_count > 1 else prompt
        out = llama_jax.generate(backend.params, backend.model, tokens, max_new_tokens, temperature, top_k, seed)
        if backend.process_count > 1:
            from jax.experimental import multihost_utils
            out = multihost_utils.process_allgather(out, tiled=True)
        return np.asarray(out, np.int32)
    if not backend.distributed and backend.platform in ("cpu", "gpu"):
        net = backend.net                # a plain module holding the whole model
    else:                                # FSDP2 shards, or an XLA device: a whole copy for decoding
        import torch
        device = backend.device if backend.platform == "gpu" else torch.device("cpu")
        net = _torch_model(backend.model, backend.get_state().params, device)
    return _torch_generate(net, prompt, max_new_tokens, temperature, top_k, seed)


def _torch_model(cfg: LlamaConfig, params: dict[str, np.ndarray], device):
    import torch
    from models.llama_torch import LlamaForCausalLM
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    net = net.to_empty(device=device)
    net.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in params.items()})
    return net.eval()


def _torch_generate(net, prompt: np.ndarray, max_new_tokens: int, temperature: float, top_k: int,
                    seed: int) -> np.ndarray:
    import torch
    from models.llama_torch import generate
    device = net.model.embed_tokens.weight.device
    out = generate(net, torch.from_numpy(prompt.astype(np.int64)).to(device), max_new_tokens, temperature, top_k, seed)
    return out.cpu().numpy().astype(np.int32)
