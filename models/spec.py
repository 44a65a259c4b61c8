"""The Llama architecture, framework-free: config, canonical parameter schema, FLOPs, reference init.

Names and layouts follow the Hugging Face `LlamaForCausalLM` state dict (Linear weights as [out, in],
RoPE in the rotate-half convention), so an HF checkpoint loads without permutation and the JAX and
PyTorch implementations hold byte-identical tensors for the same model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (`rope_type: llama3` in HF configs)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_scaling: Optional[RopeScaling] = None
    initializer_range: float = 0.02

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{field} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                             f"model.num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"model.num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (hidden_size / num_attention_heads = {self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"name"})
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        d.pop("name", None)
        rs = d.get("rope_scaling")
        if rs is not None and not isinstance(rs, RopeScaling):
            d["rope_scaling"] = RopeScaling(**dict(rs))
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Published shapes. tiny/small use the byte tokenizer's vocabulary (256 bytes + end-of-document).
BYTE_VOCAB = 257
SIZES = {
    "tiny": LlamaConfig(vocab_size=BYTE_VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "small": LlamaConfig(vocab_size=BYTE_VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
    # meta-llama/Llama-3.2-1B
    "llama3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                               rope_theta=500000.0, tie_word_embeddings=True,
                               rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192)),
    # meta-llama/Llama-3.1-8B
    "llama3.1-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                               rope_theta=500000.0, tie_word_embeddings=False,
                               rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192)),
}


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names (HF Llama layout) and shapes, in a fixed order."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def decays(name: str, shape: tuple[int, ...]) -> bool:
    """Weight decay applies to 2-D weights (matmuls, embeddings) only, never to norm gains."""
    return len(shape) == 2


def num_params(cfg: LlamaConfig) -> int:
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmul weights plus attention, as nanoGPT and MaxText count.

    N excludes the input embedding (a gather, not a matmul); the attention term is
    6 * layers * seq_len * hidden (QK^T and AV, forward and backward, causal not discounted).
    """
    n = num_params(cfg) - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    return 6.0 * n + 6.0 * cfg.num_hidden_layers * seq_len * cfg.hidden_size


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies (float32 [head_dim/2]), with Llama 3 scaling when configured (as HF does)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: LlamaConfig, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [seq_len, head_dim] in the rotate-half layout (frequencies repeated twice)."""
    inv = rope_inv_freq(cfg)
    freqs = np.outer(np.arange(seq_len, dtype=np.float32), inv).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def document_segments(tokens, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Document structure of packed token windows [..., T]: (segment ids, positions), int32, tokens' shape.

    An end-of-document token `eos_id` belongs to the document it ends; the token after it starts the
    next. segment[i] counts the EOS tokens before i; position[i] is i minus the index where segment[i]
    starts. Attention from i to j is allowed when j <= i and segment[j] == segment[i]; RoPE uses position[i].
    """
    tokens = np.asarray(tokens)
    is_eos = tokens == eos_id
    segments = np.cumsum(is_eos, axis=-1) - is_eos
    index = np.broadcast_to(np.arange(tokens.shape[-1]), tokens.shape)
    starts = np.zeros(tokens.shape, bool)
    starts[..., 0] = True
    starts[..., 1:] = is_eos[..., :-1]
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return segments.astype(np.int32), (index - first).astype(np.int32)


def reference_init(cfg: LlamaConfig, seed: int) -> dict[str, np.ndarray]:
    """The one initialisation both frameworks start from: float32 NumPy arrays, a pure function of the seed.

    Each tensor draws from its own stream (seed, tensor index), so any tensor can be made alone.
    Matmul weights ~ N(0, initializer_range); output projections scaled by 1/sqrt(2 * layers)
    (GPT-2 style); RMSNorm gains are ones.
    """
    out = {}
    resid_scale = 1.0 / math.sqrt(2 * cfg.num_hidden_layers)
    for index, (name, shape) in enumerate(param_shapes(cfg).items()):
        if len(shape) == 1:
            out[name] = np.ones(shape, np.float32)
            continue
        rng = np.random.default_rng([seed, index])
        std = cfg.initializer_range
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            std *= resid_scale
        out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
    return out


def nest(flat: dict) -> dict:
    """Canonical flat names to the nested tree that Flax and the checkpoint store use.

    {"model.layers.0.mlp.up_proj.weight": x} -> {"model": {"layers": {"0": {"mlp": ...}}}}
    """
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    """The inverse of nest."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


# Logical axes of the residual stream between the decoder blocks, [batch, seq, hidden]: a backend's rules
# may split the sequence (sequence parallelism over the tensor axis) where the blocks gather it.
RESIDUAL_AXES = ("batch", "seq", "act_embed")


def logical_axes(name: str, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axis names of a canonical parameter; a backend's rules map them onto mesh axes.

    Linear weights are [out, in]: column-parallel projections (q/k/v, gate/up) put heads or mlp on
    `out`; row-parallel ones (o, down) put them on `in`; the model dimension is `embed` everywhere.
    """
    if len(shape) == 1:
        return ("norm",)
    leaf = name.split(".")[-2]
    return {
        "embed_tokens": ("vocab", "embed"), "lm_head": ("vocab", "embed"),
        "q_proj": ("heads", "embed"), "k_proj": ("kv_heads", "embed"), "v_proj": ("kv_heads", "embed"),
        "o_proj": ("embed", "heads"),
        "gate_proj": ("mlp", "embed"), "up_proj": ("mlp", "embed"), "down_proj": ("embed", "mlp"),
    }[leaf]
