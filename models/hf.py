"""Hugging Face Llama directories <-> trichip's canonical parameters, framework-free (NumPy and JSON).

trichip's parameter names and layouts *are* the `LlamaForCausalLM` state dict (models.spec), so a
conversion is a file-format change only: no tensor is permuted or renamed, and float32 round trips
are bit-exact.

The safetensors files are read and written here directly rather than through `safetensors.numpy`:
NumPy has no bfloat16, so that API can neither read nor write the BF16 files most published Llama
checkpoints use, and the lower-level `safetensors.serialize_file` changed its argument types between
releases. The format itself is small and fixed (https://github.com/huggingface/safetensors#format):

    8 bytes   little-endian u64 N
    N bytes   JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
              padded with spaces
    rest      the tensors' bytes, little-endian, row-major, offsets relative to the end of the header

Both Hugging Face config.json dialects are read: transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
(`rope_parameters`); the 4.x dialect is written, which every transformers release since 4.45 loads.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from models.errors import UserError
from models.spec import LlamaConfig, RopeScaling, param_shapes

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = ("float32", "bfloat16")
# transformers' default shard limit ("5GB": decimal, as in save_pretrained(max_shard_size=...)).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# Non-parameter buffers that old transformers releases saved into some checkpoints; recomputed from
# the config by every implementation, so they are dropped on read.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# transformers.LlamaConfig's defaults, for keys a config.json may omit: the same file must mean the
# same model here as it does in transformers.
_HF_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "initializer_range": 0.02,
}
# Config keys carried from a source config.json into an exported one (they only matter to tokenizers
# and generation, and trichip's model spec does not hold them).
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

_ST_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}


# -- config.json ------------------------------------------------------------------------------------

def config_from_hf(config: dict, source: str = CONFIG) -> LlamaConfig:
    """A transformers Llama config.json (as a dict) -> LlamaConfig.

    Refuses, with the key to change, anything trichip's Llama does not compute the same way:
    another architecture, biases, a head_dim other than hidden_size / num_attention_heads, an
    activation other than SiLU, RoPE scaling other than Llama 3's, quantized weights.
    """
    if not isinstance(config, dict):
        raise UserError(f"{source} is not a JSON object")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise UserError(f"{source} describes model_type {model_type!r} (architectures {archs}); trichip converts "
                        f"Llama only (model_type 'llama', LlamaForCausalLM)")
    if config.get("quantization_config"):
        raise UserError(f"{source} describes quantized weights "
                        f"({config['quantization_config'].get('quant_method', '?')}); convert a float checkpoint")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UserError(f"{source} has {key}: true; trichip's Llama has no biases")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{source} has hidden_act {act!r}; trichip's Llama uses 'silu'")

    value = {k: config.get(k, default) for k, default in _HF_DEFAULTS.items()}
    value["num_key_value_heads"] = config.get("num_key_value_heads") or value["num_attention_heads"]
    theta, scaling = _rope_from_hf(config, source)
    try:
        cfg = LlamaConfig(
            vocab_size=value["vocab_size"], hidden_size=value["hidden_size"],
            intermediate_size=value["intermediate_size"], num_hidden_layers=value["num_hidden_layers"],
            num_attention_heads=value["num_attention_heads"], num_key_value_heads=value["num_key_value_heads"],
            max_position_embeddings=value["max_position_embeddings"], rope_theta=float(theta),
            rms_norm_eps=float(value["rms_norm_eps"]), tie_word_embeddings=bool(value["tie_word_embeddings"]),
            rope_scaling=scaling, initializer_range=float(value["initializer_range"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}".replace("model.", "")) from None
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise UserError(f"{source} has head_dim {head_dim}, but trichip's Llama uses hidden_size / "
                        f"num_attention_heads = {cfg.head_dim}")
    return cfg


def _rope_from_hf(config: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either dialect: transformers 5 keeps both in `rope_parameters`."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", config.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
        scaling = params
    else:
        theta = config.get("rope_theta", _HF_DEFAULTS["rope_theta"])
        scaling = config.get("rope_scaling")
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UserError(f"{source} uses RoPE scaling {kind!r}; trichip implements Llama 3 scaling "
                        f"('llama3') or none")
    partial = scaling.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise UserError(f"{source} has partial_rotary_factor {partial}; trichip's Llama rotates whole heads")
    try:
        return theta, RopeScaling(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                                  high_freq_factor=float(scaling["high_freq_factor"]),
                                  original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        raise UserError(f"{source}: llama3 RoPE scaling lacks {e.args[0]!r}") from None


def config_to_hf(cfg: LlamaConfig, dtype: str = "float32", extra: dict | None = None) -> dict:
    """LlamaConfig -> a config.json that transformers' LlamaConfig / LlamaForCausalLM load as this model.

    Token ids (bos/eos/pad) are not part of trichip's model spec: they are written only when `extra`
    carries them (from the config.json a checkpoint was imported from); otherwise transformers' defaults apply.
    """
    rs = cfg.rope_scaling
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if rs is None else {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings},
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    for key in TOKEN_ID_KEYS:
        if extra and extra.get(key) is not None:
            out[key] = extra[key]
    return out


# -- bfloat16 ---------------------------------------------------------------------------------------

def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even (as torch and JAX do).

    NaNs stay NaN (quiet); values past the largest bfloat16 round to infinity.
    """
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    out = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded)
    return out.astype(np.uint16)


def float32_from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# -- safetensors files ------------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> tuple[dict, int, dict]:
    """({name: {"dtype", "shape", "data_offsets"}}, offset of the data, metadata) of one safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise UserError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise UserError(f"{path} is not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    return header, 8 + n, metadata


def _read_tensor(path: Path, name: str, info: dict, data_start: int) -> np.ndarray:
    """One tensor of a safetensors file as float32 (F32, F16 and BF16 convert exactly)."""
    st_dtype = info.get("dtype")
    if st_dtype not in _ST_DTYPES:
        raise UserError(f"{path}: tensor {name} is {st_dtype}; trichip converts F32, F16 and BF16 weights")
    _, itemsize = _ST_DTYPES[st_dtype]
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != math.prod(shape) * itemsize:
        raise UserError(f"{path}: tensor {name} has {end - begin} bytes for shape {list(shape)} {st_dtype}; "
                        f"the file is damaged")
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = f.read(end - begin)
    if len(raw) != end - begin:
        raise UserError(f"{path} is truncated (tensor {name})")
    if st_dtype == "BF16":
        out = float32_from_bfloat16_bits(np.frombuffer(raw, "<u2"))
    else:
        out = np.frombuffer(raw, "<f4" if st_dtype == "F32" else "<f2").astype(np.float32)
    return out.reshape(shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write {name: float32 or bfloat16-bits (uint16) array} as one safetensors file, in the given order."""
    header, offset = {"__metadata__": metadata}, 0
    for name, array in tensors.items():
        st_dtype = {np.dtype(np.float32): "F32", np.dtype(np.uint16): "BF16"}[array.dtype]
        header[name] = {"dtype": st_dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)     # the data starts 8-byte aligned, as the safetensors writer does
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for array in tensors.values():
            np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tofile(f)
        f.flush()
        os.fsync(f.fileno())


# -- Hugging Face model directories -----------------------------------------------------------------

def _tensor_files(root: Path) -> list[Path]:
    """The safetensors files of a model directory: those the index names, or model.safetensors."""
    if (root / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{root / INDEX_FILE} is not a safetensors index ({e})") from None
        files = [root / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{root}: shard(s) {missing[:3]} named in {INDEX_FILE} are missing")
        return files
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    if any(root.glob("*.bin")) or any(root.glob("*.pth")):
        raise UserError(f"{root} holds PyTorch pickle weights only; trichip reads safetensors: re-save it with "
                        f"model.save_pretrained(dir, safe_serialization=True)")
    raise UserError(f"{root} has a {CONFIG} but neither {SINGLE_FILE} nor {INDEX_FILE}")


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_hf_config(path: str | os.PathLike) -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, the config.json dict) of a Hugging Face model directory."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    if not (root / CONFIG).is_file():
        raise UserError(f"{root} is not a Hugging Face model directory (no {CONFIG})")
    try:
        raw = json.loads((root / CONFIG).read_text())
    except ValueError as e:
        raise UserError(f"{root / CONFIG} is not valid JSON ({e})") from None
    return config_from_hf(raw, str(root / CONFIG)), raw


def read_hf_dir(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """A `save_pretrained` LlamaForCausalLM directory -> (config, {canonical name: float32 array}).

    Reads model.safetensors, or the shards model.safetensors.index.json names. Every tensor the config
    implies must be there with its shape; anything else is refused (it would be silently dropped),
    except rotary `inv_freq` buffers. With tied embeddings an `lm_head.weight` is accepted only if it
    equals the embedding. F16/BF16 weights become float32 exactly.
    """
    cfg, _ = read_hf_config(path)
    root = Path(path)
    where: dict[str, tuple[Path, dict, int]] = {}
    for file in _tensor_files(root):
        header, start, _ = read_safetensors_header(file)
        for name, info in header.items():
            if name in where:
                raise UserError(f"{root}: tensor {name} is in both {where[name][0].name} and {file.name}")
            where[name] = (file, info, start)
    for name in [n for n in where if n.endswith(IGNORED_SUFFIXES)]:
        del where[name]

    expected = param_shapes(cfg)
    tied_head = None
    if cfg.tie_word_embeddings and "lm_head.weight" in where:
        tied_head = where.pop("lm_head.weight")
    missing = [n for n in expected if n not in where]
    if missing:
        raise UserError(f"{root} lacks {len(missing)} tensor(s) its {CONFIG} implies, e.g. {missing[:3]}")
    unexpected = sorted(set(where) - set(expected))
    if unexpected:
        raise UserError(f"{root} holds {len(unexpected)} tensor(s) a plain LlamaForCausalLM does not have, e.g. "
                        f"{unexpected[:3]}")
    for name, shape in expected.items():
        found = tuple(where[name][1].get("shape", ()))
        if found != shape:
            raise UserError(f"{root}: tensor {name} has shape {list(found)}, but {CONFIG} implies {list(shape)}")

    params = {name: _read_tensor(where[name][0], name, where[name][1], where[name][2]) for name in expected}
    if tied_head is not None:
        head = _read_tensor(tied_head[0], "lm_head.weight", tied_head[1], tied_head[2])
        if not np.array_equal(head, params["model.embed_tokens.weight"]):
            raise UserError(f"{root}: {CONFIG} says tie_word_embeddings, but lm_head.weight differs from "
                            f"model.embed_tokens.weight; set \"tie_word_embeddings\": false if the head is separate")
    return cfg, params


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '100MiB' -> 100 * 2**20, '123' -> 123 bytes (transformers' max_shard_size units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"size {text!r} is not a number of bytes with an optional unit (e.g. 5GB, 500MB, 64MiB)")
    unit = m.group(2).upper().rstrip("B")
    factor = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(float(m.group(1)) * factor)
    if size <= 0:
        raise UserError(f"size {text!r} must be positive")
    return size


def check_target(path: str | os.PathLike) -> Path:
    """A directory about to be written must not exist, or be empty: nothing of the user's is replaced."""
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UserError(f"{p} already exists and is not an empty directory; choose a new path or remove it")
    return p


def atomic_dir(target: Path):
    """A fresh temp directory beside `target`, to be renamed onto it with `commit_dir` when complete."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, target: Path) -> None:
    """Move a completed temp directory into place (the target is absent or an empty directory)."""
    check_target(target)
    if target.is_dir():
        target.rmdir()
    os.rename(tmp, target)


def _shards(names: list[str], nbytes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of at most max_shard_bytes (a tensor larger than that gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name in names:
        if current and size + nbytes[name] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes[name]
    if current:
        shards.append(current)
    return shards


def write_hf_dir(path: str | os.PathLike, cfg: LlamaConfig, params: dict[str, np.ndarray], dtype: str = "float32",
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_config: dict | None = None) -> list[str]:
    """Write a directory `LlamaForCausalLM.from_pretrained` loads: config.json and safetensors weights,
    sharded with model.safetensors.index.json when they exceed max_shard_bytes. Returns the file names.

    params must be exactly the model's float32 tensors. dtype "float32" is lossless; "bfloat16" rounds to
    nearest even and is only done when asked for. The target must not exist (or be empty); the directory
    is assembled beside it and renamed into place, so a failure leaves nothing behind.
    """
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    expected = param_shapes(cfg)
    if set(params) != set(expected):
        diff = sorted(set(params) ^ set(expected))
        raise UserError(f"parameters do not match the model config: {diff[:3]} differ")
    for name, shape in expected.items():
        a = params[name]
        if tuple(a.shape) != shape or a.dtype != np.float32:
            raise UserError(f"parameter {name} is {a.dtype} {list(a.shape)}; expected float32 {list(shape)}")
    if max_shard_bytes <= 0:
        raise UserError(f"max shard size must be positive, got {max_shard_bytes}")
    target = check_target(path)

    itemsize = 4 if dtype == "float32" else 2
    names = list(expected)
    nbytes = {n: math.prod(expected[n]) * itemsize for n in names}
    shards = _shards(names, nbytes, max_shard_bytes)
    if len(shards) == 1:
        files = [SINGLE_FILE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    tmp = atomic_dir(target)
    try:
        for file, group in zip(files, shards):
            tensors = {n: (params[n] if dtype == "float32" else bfloat16_bits(params[n])) for n in group}
            write_safetensors(tmp / file, tensors, {"format": "pt"})   # transformers requires format "pt"
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())},
                     "weight_map": {n: file for file, group in zip(files, shards) for n in group}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG).write_text(json.dumps(config_to_hf(cfg, dtype, extra_config), indent=2) + "\n")
        commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files + ([INDEX_FILE] if len(files) > 1 else []) + [CONFIG]
