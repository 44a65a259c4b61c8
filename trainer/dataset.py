"""Token datasets: a directory of `.npy` token shards plus `dataset.json`, its index.

The index records the tokenizer's identity, the vocabulary, the token dtype (uint16 when the vocabulary
fits, uint32 otherwise), and per shard its file, token and document counts, byte size and SHA-256. A
shard is in the dataset only once the index lists it: shards are written to a temporary name, fsynced
and renamed, then the index is replaced, so a crash never leaves half a shard in the index. An index
still being written says so (`complete: false`) and where its input stopped, so a rerun resumes.

Reading memory-maps the shards; one stream of tokens runs through them in order.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import StorageError, UserError

INDEX = "dataset.json"
FORMAT = "trichip-tokens"
VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_index(directory: Path) -> dict:
    path = Path(directory) / INDEX
    try:
        return parse_index(path.read_bytes(), path)
    except FileNotFoundError:
        raise UserError(f"{directory} is not a dataset (no {INDEX}); make one with "
                        f"`python -m launch.prepare_data OUT_DIR INPUTS...`") from None
    except PermissionError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from None


def parse_index(raw: bytes, path) -> dict:
    """A dataset.json's contents, checked to be a trichip dataset index of this format version."""
    try:
        index = json.loads(raw)
    except ValueError:
        raise UserError(f"{path} is not JSON; rebuild the dataset with launch.prepare_data") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{path} is not a trichip dataset index")
    if index.get("version") != VERSION:
        raise UserError(f"{path} has dataset format version {index.get('version')}; this trichip reads {VERSION}")
    return index


def write_index(directory: Path, index: dict) -> None:
    write_atomic(Path(directory) / INDEX, json.dumps(index, indent=1).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` durably: a temporary file, fsynced, renamed, the directory fsynced."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_shard(directory: Path, number: int, tokens: np.ndarray, documents: int) -> dict:
    """Write shard `number` durably; returns its index entry."""
    name = f"shard-{number:05d}.npy"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, tokens)
            f.flush()
            os.fsync(f.fileno())
        digest = file_sha256(Path(tmp))
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"file": name, "tokens": int(tokens.size), "documents": int(documents),
            "bytes": (directory / name).stat().st_size, "sha256": digest}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class TokenStream:
    """The dataset's shards, memory-mapped, read as one stream of tokens."""
    directory: Path
    index: dict
    shards: list            # memory-mapped arrays
    offsets: np.ndarray     # offsets[i]: the stream position of shard i's first token; offsets[-1] = total

    @classmethod
    def open(cls, directory: str | os.PathLike, require_complete: bool = True) -> "TokenStream":
        directory = Path(directory)
        index = read_index(directory)
        if require_complete and not index.get("complete"):
            raise UserError(f"{directory} is a dataset still being written (or its writer stopped); rerun the "
                            f"same `python -m launch.prepare_data` command to finish it")
        dtype = np.dtype(index["dtype"])
        shards = [_open_shard(directory, entry, dtype) for entry in index["shards"]]
        if not shards:
            raise UserError(f"{directory} holds no tokens")
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)
        return cls(directory, index, shards, offsets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream (across shard boundaries), as int32."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts, pos = [], start
        for i in range(first, len(self.shards)):
            if pos >= stop:
                break
            lo = pos - int(self.offsets[i])
            hi = min(stop, int(self.offsets[i + 1])) - int(self.offsets[i])
            parts.append(self.shards[i][lo:hi])
            pos = int(self.offsets[i]) + hi
        out = np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
        return out.astype(np.int32)

    def bytes_per_token(self) -> float:
        """UTF-8 bytes of source text per token of the stream (EOS tokens included)."""
        return float(self.index.get("text_bytes", 0)) / max(len(self), 1)

    def unigram_entropy(self, upto: int) -> float:
        """Cross-entropy (nats/token) of the unigram distribution of tokens [0, upto): the baseline to beat
        (callers bound `upto`: this reads every token up to it)."""
        counts = np.zeros(self.vocab_size, np.int64)
        for i, shard in enumerate(self.shards):
            lo, hi = int(self.offsets[i]), min(int(self.offsets[i + 1]), upto)
            if hi > lo:
                counts += np.bincount(np.asarray(shard[: hi - lo]), minlength=self.vocab_size)[: self.vocab_size]
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def _open_shard(directory: Path, entry: dict, dtype: np.dtype) -> np.ndarray:
    path = directory / entry["file"]
    try:
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise UserError(f"shard {path} has {size} bytes but {directory / INDEX} says {entry['bytes']}: the "
                            f"shard and the index do not belong together; rebuild the dataset with launch.prepare_data")
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise UserError(f"shard {path} listed in {directory / INDEX} is missing") from None
    except PermissionError as e:
        raise StorageError(f"cannot read shard {path}: {e.strerror}") from None
    except (ValueError, EOFError) as e:
        raise UserError(f"shard {path} is not a token shard (.npy): {e}") from None
    if arr.ndim != 1 or arr.dtype != dtype or len(arr) != entry["tokens"]:
        raise UserError(f"shard {path} holds {arr.dtype} {arr.shape} but {directory / INDEX} says {dtype} "
                        f"[{entry['tokens']}]; rebuild the dataset with launch.prepare_data")
    return arr
