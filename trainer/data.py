"""Data: a byte-level tokenizer, memory-mapped token files, and batches that are a pure function of
(seed, step), so a resume needs nothing but the step, on any device count or framework."""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from hal.base import UserError

EOS = 256           # end-of-document token; bytes are 0..255
VOCAB_SIZE = 257
BUILTIN = {"python_docs": Path(__file__).parent / "corpus" / "python_docs.txt.gz"}
TOKEN_DTYPE = np.uint16


def encode(text: bytes | str) -> np.ndarray:
    """Byte-level tokenizer: UTF-8 bytes are the tokens."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    return np.frombuffer(text, dtype=np.uint8).astype(TOKEN_DTYPE)


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens if int(t) < 256).decode("utf-8", errors="replace")


def write_token_file(out: str | os.PathLike, documents, source: str = "") -> Path:
    """Tokenize documents (bytes or str each) into OUT (.npy, uint16) with OUT's .json metadata beside it.
    Documents are separated by EOS. Written to a temp file and renamed: never half a token file."""
    out = Path(out)
    if out.suffix != ".npy":
        raise UserError(f"token file {out} must end in .npy")
    parts = []
    for doc in documents:
        toks = encode(doc)
        if len(toks):
            parts.extend([toks, np.array([EOS], TOKEN_DTYPE)])
    if not parts:
        raise UserError(f"no text to tokenize for {out} (the inputs are empty)")
    tokens = np.concatenate(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, tokens)
    meta = {"tokenizer": "bytes", "vocab_size": VOCAB_SIZE, "num_tokens": int(tokens.size), "source": source}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    return out


def builtin_token_file(name: str) -> Path:
    """The shipped corpus, tokenized once into the user's cache (TRICHIP_CACHE or ~/.cache/trichip)."""
    if name not in BUILTIN:
        raise UserError(f"unknown built-in corpus {name!r}; built-ins are {sorted(BUILTIN)}")
    cache = Path(os.environ.get("TRICHIP_CACHE", Path.home() / ".cache" / "trichip"))
    out = cache / f"{name}.npy"
    if not out.exists():
        with gzip.open(BUILTIN[name], "rb") as f:
            write_token_file(out, [f.read()], source=f"builtin:{name}")
    return out


class TokenData:
    """A token file split into train and held-out parts; batches are pure functions of (seed, step).

    Train batch at step s: `global_batch` windows of seq_len + 1 tokens, each starting at an offset
    drawn by NumPy's PCG64 seeded with (seed, 0, s). Held-out batches draw with (seed, 1, i) from the
    last `eval_fraction` of the file, which training never reads.
    """

    def __init__(self, path: str, seq_len: int, seed: int, vocab_size: int, eval_fraction: float = 0.05):
        if path.startswith("builtin:"):
            path = str(builtin_token_file(path[len("builtin:"):]))
        if not os.path.isfile(path):
            raise UserError(f"data.path {path!r} does not exist; give a token file made by "
                            f"`python -m launch.prepare_data OUT.npy TEXT...` or builtin:python_docs")
        try:
            self.tokens = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"data.path {path!r} is not a token file (.npy): {e or type(e).__name__}") from None
        if self.tokens.ndim != 1 or self.tokens.dtype.kind not in "ui":
            raise UserError(f"data.path {path!r} must hold a 1-D integer array, got {self.tokens.dtype} "
                            f"{self.tokens.shape}")
        if not 0 < eval_fraction < 1:
            raise UserError(f"data.eval_fraction must be in (0, 1), got {eval_fraction}")
        self.path, self.seq_len, self.seed = path, seq_len, seed
        n = len(self.tokens)
        self.split = int(n * (1 - eval_fraction))
        if min(self.split, n - self.split) < seq_len + 2:
            raise UserError(f"data.path {path!r} has {n} tokens: too few for seq_len {seq_len} with a "
                            f"held-out split of {eval_fraction}; use more text or a shorter trainer.seq_len")
        self._check_sidecar(Path(path), vocab_size)

    def _check_sidecar(self, path: Path, vocab_size: int) -> None:
        """The token file's .json (written beside it by prepare_data) must agree with the file, and the token
        ids must fit the model's vocabulary (an id past it would index outside the embedding)."""
        meta_path = path.with_suffix(".json")
        meta = {}
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                raise UserError(f"{meta_path} is not JSON; rewrite it with launch.prepare_data or remove it") from None
            if not isinstance(meta, dict):
                raise UserError(f"{meta_path} is not a token-file description (a JSON object)")
        if "num_tokens" in meta and meta["num_tokens"] != len(self.tokens):
            raise UserError(f"{path} holds {len(self.tokens)} tokens but {meta_path} says {meta['num_tokens']}: "
                            f"the two do not belong together; rewrite them with launch.prepare_data")
        low, top = int(self.tokens.min()), int(self.tokens.max())
        if low < 0:
            raise UserError(f"data.path {str(path)!r} holds negative token ids ({low}); it is not a token file")
        if "vocab_size" in meta and top >= meta["vocab_size"]:
            raise UserError(f"{path} has token ids up to {top} but {meta_path} says vocab_size {meta['vocab_size']}: "
                            f"the two do not belong together; rewrite them with launch.prepare_data")
        top = max(top, meta.get("vocab_size", 0) - 1)
        if top >= vocab_size:
            raise UserError(f"data.path {str(path)!r} has token ids up to {top} but the model's vocab_size is "
                            f"{vocab_size}; pick a model whose vocabulary covers the tokenizer")

    def _windows(self, lo: int, hi: int, rng: np.random.Generator, count: int) -> np.ndarray:
        starts = rng.integers(lo, hi - self.seq_len - 1, size=count, endpoint=True)
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return np.asarray(self.tokens[idx], dtype=np.int32)

    def train_batch(self, step: int, global_batch: int) -> np.ndarray:
        """int32 [global_batch, seq_len + 1]."""
        return self._windows(0, self.split, np.random.default_rng([self.seed, 0, step]), global_batch)

    def eval_batch(self, index: int, global_batch: int) -> np.ndarray:
        return self._windows(self.split, len(self.tokens), np.random.default_rng([self.seed, 1, index]),
                             global_batch)

    def unigram_entropy(self) -> float:
        """Cross-entropy (nats/token) of the train split's unigram distribution: the baseline to beat."""
        counts = np.bincount(np.asarray(self.tokens[: self.split]), minlength=1).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
