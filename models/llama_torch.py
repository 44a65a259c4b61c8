"""Llama in PyTorch, over the canonical parameter schema of models.spec.

Module names reproduce Hugging Face's `LlamaForCausalLM`, so `state_dict()` keys are the canonical names
(`model.layers.0.self_attn.q_proj.weight`, ...) and nn.Linear already stores weights [out, in].
With `document_eos`, attention stays inside each document of a packed window and RoPE positions restart
per document (models.spec.document_segments defines both): through SDPA with a boolean mask, or through
flex_attention with a block mask (`flex_attention = True`, what the backend sets on CUDA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.spec import LlamaConfig, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: [B, heads, T, head_dim]; cos/sin: [T, head_dim], or [B, 1, T, head_dim] at per-document positions
    return x * cos + rotate_half(x) * sin


def document_segments(tokens, eos_id: int):
    """models.spec.document_segments in torch: (segment ids, positions) long [B, T] of tokens [B, T]."""
    is_eos = (tokens == eos_id).long()
    segments = is_eos.cumsum(-1) - is_eos
    index = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
    starts = torch.cat([torch.ones_like(is_eos[:, :1]), is_eos[:, :-1]], dim=-1).bool()
    first = torch.where(starts, index, 0).cummax(-1).values
    return segments, index - first


def document_mask(segments):
    """bool [B, 1, T, T]: query i may read key j <= i of its own document (for SDPA's attn_mask)."""
    t = segments.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def document_block_mask(segments):
    """The same mask as a flex_attention BlockMask: blocks with no allowed pair are never computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, kv):
        return (segments[b, q] == segments[b, kv]) & (kv <= q)
    b, t = segments.shape
    return create_block_mask(same_document_causal, b, None, t, t, device=segments.device)


_compiled_flex_attention = None


def flex_attention(q, k, v, block_mask, enable_gqa: bool):
    """torch.nn.attention.flex_attention, compiled once (uncompiled it materializes every score)."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention as flex
        _compiled_flex_attention = torch.compile(flex, dynamic=False)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask=None):
        b, t, _ = x.shape
        cfg, hd = self.cfg, self.cfg.head_dim
        # -1: the heads this rank holds (all of them, or its share under tensor parallelism)
        q = self.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # enable_gqa: query head j reads kv head j // (heads / kv_heads), as HF's repeat_kv does.
        gqa = cfg.num_key_value_heads != cfg.num_attention_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, torch.Tensor):      # document_mask: causality included
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:                                     # document_block_mask
            out = flex_attention(q, k, v, mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """tokens [B, T] long -> logits [B, T, vocab] float32.

    document_eos: the end-of-document token id of packed windows, or None (one causal sequence per row)."""

    def __init__(self, cfg: LlamaConfig, document_eos: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.document_eos = document_eos
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.flex_attention = False     # document masks through flex_attention (else SDPA with a bool mask)
        self.loss_chunk = 0             # forward(tokens, targets): tokens per loss chunk, 0 = the whole logits
        self._rope: dict = {}

    def rope(self, seq_len: int, device, dtype):
        key = (seq_len, str(device), dtype)
        if key not in self._rope:
            cos, sin = rope_tables(self.cfg, seq_len)
            self._rope[key] = (torch.from_numpy(cos).to(device, dtype), torch.from_numpy(sin).to(device, dtype))
        return self._rope[key]

    def hidden_states(self, tokens):
        """The final norm's output [B, T, hidden]."""
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope(tokens.shape[1], x.device, x.dtype)
        mask = None
        if self.document_eos is not None:
            segments, positions = document_segments(tokens, self.document_eos)
            cos, sin = cos[positions][:, None], sin[positions][:, None]
            mask = document_block_mask(segments) if self.flex_attention else document_mask(segments)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.model.norm(x)

    def output_weight(self):
        """The output layer's weight [vocab, hidden]: lm_head's, or the tied embedding's. Inside forward under
        FSDP2 this is the unsharded parameter, whose gradient FSDP2 reduce-scatters."""
        return self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def forward(self, tokens, targets=None):
        """Logits float32 [B, T, vocab]; with targets [B, T], the mean next-token cross-entropy instead:
        chunked_cross_entropy over chunks of about `loss_chunk` tokens, or through the whole logits when
        loss_chunk is 0."""
        h = self.hidden_states(tokens)
        if targets is not None and self.loss_chunk:
            return chunked_cross_entropy(h, self.output_weight(), targets, max(1, self.loss_chunk // h.shape[0]))
        logits = F.linear(h, self.model.embed_tokens.weight) if self.cfg.tie_word_embeddings else self.lm_head(h)
        return logits.float() if targets is None else cross_entropy(logits, targets)


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy in float32. logits [B, T, V], targets [B, T] long."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def chunked_cross_entropy(h, w, targets, positions: int):
    """cross_entropy of the logits h @ w^T without holding them whole: h [B, T, hidden], w [vocab, hidden],
    targets [B, T] long; the positions taken `positions` at a time (B x positions tokens a chunk, the last
    chunk shorter). The compute dtype is autocast's where it is on, else h's; each chunk's logits are
    upcast to float32 for the logsumexp. The mean is over the B x T targets. A chunk of the whole rows is
    the plain loss through the whole logits (chunking them would only add the gradient accumulators)."""
    if positions >= h.shape[1]:
        return cross_entropy(F.linear(h, w), targets)
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with_grads = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    return _ChunkedCrossEntropy.apply(h.to(dtype), w.to(dtype), targets, positions, with_grads)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The loss and, when a backward will come, its gradients, chunk by chunk in the forward: each chunk's
    logits become d(sum of losses)/d(logits) = softmax - onehot in place, are multiplied into the gradients
    of h (one slice each) and w (summed in float32), and are freed. The backward only scales the two."""

    @staticmethod
    def forward(ctx, h, w, targets, positions: int, with_grads: bool):
        b, t, _ = h.shape
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if with_grads else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if with_grads else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, t, positions):
                x, y = h[:, start:start + positions], targets[:, start:start + positions, None]
                logits = F.linear(x, w).float()
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                total += (lse - logits.gather(-1, y)).sum()
                if with_grads:
                    grad = logits.sub_(lse).exp_().scatter_add_(-1, y, torch.full_like(y, -1, dtype=logits.dtype))
                    grad = grad.to(h.dtype)
                    grad_h[:, start:start + positions] = grad @ w
                    if w.dtype == torch.float32:
                        grad_w.addmm_(grad.flatten(0, 1).t(), x.flatten(0, 1))
                    else:      # the product in the compute dtype, summed over the chunks in float32
                        grad_w += grad.flatten(0, 1).t() @ x.flatten(0, 1)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype, ctx.count = w.dtype, b * t
        return total / ctx.count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.count
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.w_dtype), None, None, None


# -- decoding with a KV cache ---------------------------------------------------------------------------------

def init_cache(cfg: LlamaConfig, batch: int, length: int, device, dtype=torch.float32) -> dict:
    """Keys and values of every layer for `length` positions: {"k", "v"}: [layers, B, kv_heads, length, head_dim]."""
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length, cfg.head_dim)
    return {"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype)}


def _attend_cached(attn: Attention, x, cos, sin, cache: dict, layer: int, start: int, mask):
    """Attention of x [B, T, hidden] at positions start.. over the cached keys and values of the earlier
    positions; writes this block's keys and values into the cache."""
    b, t, _ = x.shape
    cfg, hd = attn.cfg, attn.cfg.head_dim
    q = apply_rope(attn.q_proj(x).view(b, t, cfg.num_attention_heads, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(b, t, cfg.num_key_value_heads, hd).transpose(1, 2), cos, sin)
    cache["k"][layer, :, :, start:start + t] = k
    cache["v"][layer, :, :, start:start + t] = attn.v_proj(x).view(b, t, cfg.num_key_value_heads, hd).transpose(1, 2)
    keys, values = cache["k"][layer, :, :, :start + t], cache["v"][layer, :, :, :start + t]
    gqa = cfg.num_key_value_heads != cfg.num_attention_heads
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


@torch.no_grad()
def forward_cached(model: LlamaForCausalLM, tokens, cache: dict, start: int):
    """Logits float32 [B, T, vocab] of tokens [B, T] at positions start..start+T-1, the earlier positions' keys
    and values read from `cache` (init_cache) and theirs written into it. Equals model(tokens) for the whole
    sequence; `model` is a plain (unsharded) LlamaForCausalLM."""
    t, length = tokens.shape[1], cache["k"].shape[3]
    x = model.model.embed_tokens(tokens)
    cos, sin = model.rope(length, x.device, x.dtype)
    cos, sin = cos[start:start + t], sin[start:start + t]
    # query i sits at position start + i and reads every key at a position up to its own
    mask = torch.arange(start + t, device=x.device)[None, :] <= start + torch.arange(t, device=x.device)[:, None]
    for i, layer in enumerate(model.model.layers):
        x = x + _attend_cached(layer.self_attn, layer.input_layernorm(x), cos, sin, cache, i, start, mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = model.model.norm(x)
    w = model.model.embed_tokens.weight if model.cfg.tie_word_embeddings else model.lm_head.weight
    return F.linear(h, w).float()


def choose_token(logits, temperature: float, top_k: int, generator):
    """The next token of each row of logits [B, vocab]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k most likely tokens (every token when top_k is 0)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: LlamaForCausalLM, prompt, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0):
    """long [B, max_new_tokens] continuing prompt long [B, P] (P >= 1): one prefill of the prompt, then one
    cached step per token. Draws come from a torch.Generator seeded with `seed` on the prompt's device."""
    b, p = prompt.shape
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    cache = init_cache(model.cfg, b, p + max_new_tokens, prompt.device, model.model.embed_tokens.weight.dtype)
    logits = forward_cached(model, prompt, cache, 0)[:, -1]
    out = []
    for i in range(max_new_tokens):
        out.append(choose_token(logits, temperature, top_k, generator))
        if i + 1 < max_new_tokens:
            logits = forward_cached(model, out[-1][:, None], cache, p + i)[:, -1]
    return torch.stack(out, dim=1)


# -- float8 training ------------------------------------------------------------------------------------------

def fp8_eligible(fqn: str, module: nn.Module) -> bool:
    """Whether convert_to_fp8 converts this Linear: the projections of the decoder blocks (attention and MLP),
    not the output layer, and only where both dims are multiples of 16 (what float8 GEMMs take)."""
    return (fqn.startswith("model.layers.") and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def convert_to_fp8(net: LlamaForCausalLM) -> list[str]:
    """Swap the decoder blocks' nn.Linear layers for torchao's Float8Linear, in place, with torchao's default
    recipe: dynamic tensorwise scaling, inputs and weights in e4m3 and output gradients in e5m2, each scale
    from the tensor's own amax. The output layer (lm_head, or the tied embedding) stays in the compute dtype,
    as torchtitan keeps it. Parameter names, shapes and dtypes are unchanged (a Float8Linear holds a plain
    weight and no scaling state), so state dicts and checkpoints are those of the unconverted model. Works on
    a meta-device model. Returns the names of the converted modules."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        raise UserError("trainer.precision=fp8 on torch needs torchao: pip install 'trichip[fp8]'") from None
    convert_to_float8_training(net, config=Float8LinearConfig(),
                               module_filter_fn=lambda module, fqn: fp8_eligible(fqn, module))
    return [name for name, module in net.named_modules() if isinstance(module, Float8Linear)]
