"""Llama in Flax (linen), over the canonical parameter schema of models.spec.

The parameter tree nests the Hugging Face names: params["model"]["layers"]["0"]["self_attn"]["q_proj"]
["weight"] is `model.layers.0.self_attn.q_proj.weight`, stored [out, in] exactly as HF stores it.
Read top to bottom: RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU, the decoder.
With `document_eos`, attention stays inside each document of a packed window and RoPE positions restart
per document (models.spec.document_segments defines both).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn

from models.spec import LlamaConfig, flatten, nest, rope_tables  # noqa: F401  (nest/flatten re-exported)


def matmul_t(x, w):
    """x [..., in] @ w[out, in]^T on 2-D operands: XLA's CPU backend runs a [tokens, in] x [in, out] dot
    as one large GEMM, faster than the batched einsum form (bench/profile_step.py)."""
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w.T)
    return y.reshape(*x.shape[:-1], w.shape[0])


def fp8_quantize(x, dtype):
    """Per-tensor dynamic scaling to a float8 `dtype`: (q, scale) with x ~= q * scale, where scale = amax(|x|) /
    the format's largest finite value, taken from x itself (no amax history, so no state; torchao's default
    recipe does the same). A tensor of zeros gets scale 1."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x))
    largest = float(jnp.finfo(dtype).max)
    scale = jnp.where(amax > 0, amax / largest, 1.0)
    return jnp.clip(x / scale, -largest, largest).astype(dtype), scale


def _scaled_dot(a, a_scale, b, b_scale, contract, dtype):
    """dot_general of two float8 operands contracting dims `contract`, accumulated in float32, rescaled."""
    y = jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)
    return (y * (a_scale * b_scale)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_dot_t(x, w, dtype):
    return _fp8_dot_t_fwd(x, w, dtype)[0]


def _fp8_dot_t_fwd(x, w, dtype):
    qx, sx = fp8_quantize(x, jnp.float8_e4m3fn)
    qw, sw = fp8_quantize(w, jnp.float8_e4m3fn)
    return _scaled_dot(qx, sx, qw, sw, ((1,), (1,)), dtype), (qx, sx, qw, sw)


def _fp8_dot_t_bwd(dtype, saved, g):
    """The output's gradient in e5m2 (wider range, fewer bits: what gradients need); the float8 operands
    saved by the forward pass are reused."""
    qx, sx, qw, sw = saved
    qg, sg = fp8_quantize(g, jnp.float8_e5m2)
    dx = _scaled_dot(qg, sg, qw, sw, ((1,), (0,)), dtype)      # [tokens, out] x [out, in]
    dw = _scaled_dot(qg, sg, qx, sx, ((0,), (0,)), dtype)      # [tokens, out]^T x [tokens, in]
    return dx, dw


_fp8_dot_t.defvjp(_fp8_dot_t_fwd, _fp8_dot_t_bwd)


def fp8_matmul_t(x, w):
    """matmul_t in float8, output in x's dtype: x and w quantized to e4m3 with one dynamic scale each, the
    output's gradient to e5m2 in the backward pass; products accumulated in float32. On Hopper-class GPUs
    XLA runs these dots as cuBLASLt float8 GEMMs."""
    y = _fp8_dot_t(x.reshape(-1, x.shape[-1]), w.astype(x.dtype), x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


class Linear(nn.Module):
    """y = x W^T with W stored [out, in] (the HF/PyTorch layout), no bias. fp8: the product in float8
    (fp8_matmul_t); W stays float32 in the parameter tree either way."""
    features: int
    dtype: jnp.dtype = jnp.float32
    fp8: bool = False

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.zeros_init(), (self.features, x.shape[-1]), jnp.float32)
        return (fp8_matmul_t if self.fp8 else matmul_t)(x.astype(self.dtype), w.astype(self.dtype))


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones_init(), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (w * x32).astype(self.dtype)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    # x: [B, T, heads, head_dim]; cos/sin: [T, head_dim], or [B, T, head_dim] at per-document positions
    index = (None, slice(None), None) if cos.ndim == 2 else (slice(None), slice(None), None)
    cos, sin = cos[index], sin[index]
    return (x * cos + rotate_half(x) * sin).astype(x.dtype)


def document_segments(tokens, eos_id: int):
    """models.spec.document_segments in jnp: (segment ids, positions) int32 [B, T] of tokens [B, T]."""
    is_eos = tokens == eos_id
    segments = jnp.cumsum(is_eos, axis=-1, dtype=jnp.int32) - is_eos.astype(jnp.int32)
    index = jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
    starts = jnp.concatenate([jnp.ones_like(is_eos[:, :1]), is_eos[:, :-1]], axis=-1)
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return segments, index - first


def document_mask(segments):
    """bool [B, 1, T, T]: query i may read key j of its own document (causality is added by the caller)."""
    return (segments[:, :, None] == segments[:, None, :])[:, None]


class Attention(nn.Module):
    cfg: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    attention: str | None = None     # jax.nn.dot_product_attention's implementation: None (XLA) or "cudnn"
    fp8: bool = False                # the projections in float8 (Linear.fp8)

    @nn.compact
    def __call__(self, x, cos, sin, mask=None):
        cfg, hd = self.cfg, self.cfg.head_dim
        b, t, _ = x.shape
        h, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        q = Linear(h * hd, self.dtype, self.fp8, name="q_proj")(x).reshape(b, t, h, hd)
        k = Linear(kvh * hd, self.dtype, self.fp8, name="k_proj")(x).reshape(b, t, kvh, hd)
        v = Linear(kvh * hd, self.dtype, self.fp8, name="v_proj")(x).reshape(b, t, kvh, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Grouped-query attention (query head j reads kv head j // (h // kvh), as HF's repeat_kv does).
        # implementation None is XLA's (it materialises the scores); "cudnn" is cuDNN flash attention
        # (GPUs, bf16/fp16), which the backend asks for on GPUs. A document mask [B, 1, T, T] narrows the
        # causal mask (cuDNN takes it as an additive bias).
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=self.attention)
        out = out.reshape(b, t, h * hd)
        return Linear(cfg.hidden_size, self.dtype, self.fp8, name="o_proj")(out)


class MLP(nn.Module):
    cfg: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    fp8: bool = False

    @nn.compact
    def __call__(self, x):
        f = self.cfg.intermediate_size
        gate = Linear(f, self.dtype, self.fp8, name="gate_proj")(x)
        up = Linear(f, self.dtype, self.fp8, name="up_proj")(x)
        return Linear(self.cfg.hidden_size, self.dtype, self.fp8, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    attention: str | None = None
    fp8: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask=None):
        eps = self.cfg.rms_norm_eps
        x = x + Attention(self.cfg, self.dtype, self.attention, self.fp8, name="self_attn")(
            RMSNorm(eps, self.dtype, name="input_layernorm")(x), cos, sin, mask)
        return x + MLP(self.cfg, self.dtype, self.fp8, name="mlp")(
            RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x))


class Embed(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens):
        w = self.param("weight", nn.initializers.zeros_init(), (self.cfg.vocab_size, self.cfg.hidden_size),
                       jnp.float32)
        return jnp.take(w, tokens, axis=0)


class Decoder(nn.Module):
    cfg: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention: str | None = None
    document_eos: int | None = None
    fp8: bool = False

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        x = Embed(cfg, name="embed_tokens")(tokens).astype(self.dtype)
        cos, sin = (jnp.asarray(a, self.dtype) for a in rope_tables(cfg, tokens.shape[1]))
        mask = None
        if self.document_eos is not None:
            segments, positions = document_segments(tokens, self.document_eos)
            cos, sin, mask = cos[positions], sin[positions], document_mask(segments)
        layers = _Layers(cfg, self.dtype, self.remat, self.attention, self.fp8, name="layers")
        return RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(layers(x, cos, sin, mask))


class _Layers(nn.Module):
    """Holds the blocks as layers/0, layers/1, ... so the tree nests the HF names exactly."""
    cfg: LlamaConfig
    dtype: jnp.dtype
    remat: bool
    attention: str | None = None
    fp8: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask=None):
        layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        for i in range(self.cfg.num_hidden_layers):
            x = layer_cls(self.cfg, self.dtype, self.attention, self.fp8, name=str(i))(x, cos, sin, mask)
        return x


class LlamaForCausalLM(nn.Module):
    """tokens [B, T] int32 -> logits [B, T, vocab] float32; `hidden_states` stops before the output layer
    (for chunked_cross_entropy, with output_weight(params, cfg)).

    document_eos: the end-of-document token id of packed windows, or None (one causal sequence per row)."""
    cfg: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention: str | None = None
    document_eos: int | None = None
    fp8: bool = False        # the decoder blocks' projections in float8; the output layer stays in `dtype`

    def setup(self):
        self.model = Decoder(self.cfg, self.dtype, self.remat, self.attention, self.document_eos, self.fp8)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = Linear(self.cfg.vocab_size, self.dtype)

    def hidden_states(self, tokens):
        """The final norm's output [B, T, hidden] in the compute dtype."""
        return self.model(tokens)

    def __call__(self, tokens):
        h = self.hidden_states(tokens)
        if self.cfg.tie_word_embeddings:
            logits = matmul_t(h, self.model.variables["params"]["embed_tokens"]["weight"].astype(self.dtype))
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)


def output_weight(params, cfg: LlamaConfig):
    """The output layer's weight [vocab, hidden] in the parameter tree: lm_head, or the tied embedding."""
    return params["model"]["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy in float32. logits [B, T, V], targets [B, T] int."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def chunked_cross_entropy(h, w, targets, positions: int):
    """cross_entropy of the logits h @ w^T without holding them whole: h [B, T, hidden] (the compute dtype),
    w [vocab, hidden], targets [B, T] int. The positions are taken `positions` at a time (B x positions
    tokens a chunk; the last chunk padded with ignored targets); each chunk's logits are computed in h's
    dtype, upcast to float32 for the logsumexp, and recomputed in the backward (jax.checkpoint), so
    neither pass holds more than one chunk's logits. The mean is over the B x T real targets. A chunk of the
    whole rows is the plain loss through the whole logits (a scan of one chunk would only add the weight
    gradient's accumulator)."""
    b, t, hidden = h.shape
    if positions >= t:
        return cross_entropy(matmul_t(h, w.astype(h.dtype)), targets)
    chunks = -(-t // positions)
    pad = chunks * positions - t
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    xs = (h.reshape(b, chunks, positions, hidden).swapaxes(0, 1), targets.reshape(b, chunks, positions).swapaxes(0, 1))

    @jax.checkpoint
    def chunk_sum(w, x, y):     # w cast inside: the scan sums the weight's gradient in w's own dtype (float32)
        logits = matmul_t(x, w.astype(x.dtype)).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, jnp.maximum(y, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(y >= 0, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0))

    total, _ = jax.lax.scan(lambda acc, xy: (acc + chunk_sum(w, *xy), None), jnp.zeros((), jnp.float32), xs)
    return total / (b * t)


# -- decoding with a KV cache: the same Llama as functions of the parameter tree --------------------------------

def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """Keys and values of every layer for `length` positions: {"k", "v"}: [layers, B, length, kv_heads, head_dim]."""
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _norm(x, weight, eps):
    return RMSNorm(eps).apply({"params": {"weight": weight}}, x)


def _attend_cached(p, cfg: LlamaConfig, x, cos, sin, cache: dict, layer: int, start, mask):
    """Attention of x [B, T, hidden] at positions start.. over the cached keys and values of the earlier
    positions; writes this block's keys and values into the cache. Returns (output, cache)."""
    b, t, _ = x.shape
    h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = apply_rope(matmul_t(x, p["q_proj"]["weight"]).reshape(b, t, h, hd), cos, sin)
    k = apply_rope(matmul_t(x, p["k_proj"]["weight"]).reshape(b, t, kvh, hd), cos, sin)
    v = matmul_t(x, p["v_proj"]["weight"]).reshape(b, t, kvh, hd)
    at = (layer, 0, start, 0, 0)
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), at),
             "v": jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), at)}
    out = jax.nn.dot_product_attention(q, cache["k"][layer], cache["v"][layer], mask=mask)
    return matmul_t(out.reshape(b, t, h * hd), p["o_proj"]["weight"]), cache


def forward_cached(params, cfg: LlamaConfig, tokens, cache: dict, start):
    """Logits float32 [B, T, vocab] of tokens [B, T] at positions start..start+T-1, the earlier positions'
    keys and values read from `cache` (init_cache), theirs written into it: (logits, cache). `params` is
    the tree LlamaForCausalLM holds; the result equals its logits for the whole sequence."""
    m, eps = params["model"], cfg.rms_norm_eps
    t, length = tokens.shape[1], cache["k"].shape[2]
    cos, sin = (jax.lax.dynamic_slice_in_dim(jnp.asarray(a), start, t) for a in rope_tables(cfg, length))
    # query i sits at position start + i and reads every key at a position up to its own
    mask = (jnp.arange(length)[None, :] <= start + jnp.arange(t)[:, None])[None, None]
    x = jnp.take(m["embed_tokens"]["weight"], tokens, axis=0)
    for i in range(cfg.num_hidden_layers):
        lp = m["layers"][str(i)]
        a, cache = _attend_cached(lp["self_attn"], cfg, _norm(x, lp["input_layernorm"]["weight"], eps), cos, sin,
                                  cache, i, start, mask)
        x = x + a
        h, mlp = _norm(x, lp["post_attention_layernorm"]["weight"], eps), lp["mlp"]
        x = x + matmul_t(nn.silu(matmul_t(h, mlp["gate_proj"]["weight"])) * matmul_t(h, mlp["up_proj"]["weight"]),
                         mlp["down_proj"]["weight"])
    h = _norm(x, m["norm"]["weight"], eps)
    return matmul_t(h, output_weight(params, cfg)).astype(jnp.float32), cache


def choose_token(logits, key, temperature: float, top_k: int):
    """The next token of each row of logits [B, vocab]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k most likely tokens (every token when top_k is 0)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(params, cfg: LlamaConfig, prompt, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0):
    """int32 [B, max_new_tokens] continuing prompt int32 [B, P] (P >= 1): one prefill of the prompt, then one
    cached step per token, compiled as one program. Draws come from jax.random.key(seed), one fold per token."""
    return _generate(params, jnp.asarray(prompt, jnp.int32), jax.random.key(seed), cfg=cfg, steps=max_new_tokens,
                     temperature=float(temperature), top_k=int(top_k))


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "temperature", "top_k"))
def _generate(params, prompt, key, *, cfg, steps, temperature, top_k):
    b, p = prompt.shape
    logits, cache = forward_cached(params, cfg, prompt, init_cache(cfg, b, p + steps), 0)
    first = choose_token(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k)

    def step(carry, i):        # token i - 1 (at position p + i - 1) in, token i out
        cache, token = carry
        logits, cache = forward_cached(params, cfg, token[:, None], cache, p + i - 1)
        token = choose_token(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k)
        return (cache, token), token
    _, rest = jax.lax.scan(step, (cache, first), jnp.arange(1, steps))
    return jnp.concatenate([first[:, None], rest.T], axis=1)
