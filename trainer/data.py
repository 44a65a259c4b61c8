"""Data: token datasets (trainer.dataset) read as packed windows, batches a pure function of (seed, step).

Each source's token stream (documents packed, each followed by EOS) is cut into windows of seq_len + 1
tokens that overlap by one token, so every token is a target once. The last `eval_fraction` of the
windows are held out (one window is left between, so no token is shared). Training visits every train
window once per epoch, in an order that is a keyed permutation of the window numbers (trainer.sampling):
row r of step s reads sample s * global_batch + r, whose epoch and window follow from arithmetic. With
several sources, `trainer.sampling.Mixture` picks the source of each row first. So a resume, on any
framework, device or process count, needs only the step, and a process reads only the rows it asks for.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import StorageError, UserError
from trainer import dataset as ds
from trainer import sampling
from trainer import tokenizer as tk

BUILTIN = {"python_docs": Path(__file__).parent / "corpus" / "python_docs.txt.gz"}


def cache_dir() -> Path:
    return Path(os.environ.get("TRICHIP_CACHE", Path.home() / ".cache" / "trichip"))


@dataclass
class Source:
    """One dataset, cut into windows: `n_train` train windows, a gap of one, then `n_eval` held-out ones."""
    name: str
    weight: float
    stream: ds.TokenStream
    seq_len: int
    n_train: int            # train windows
    n_eval: int             # held-out windows

    @classmethod
    def open(cls, name: str, path: str, weight: float, seq_len: int, eval_fraction: float,
             tokenizer: str | None) -> "Source":
        stream = ds.TokenStream.open(resolve(path, tokenizer))
        windows = (len(stream) - 1) // seq_len
        held = max(1, round(windows * eval_fraction))
        train = windows - held - 1
        if train < 1:
            raise UserError(f"data source {path!r} has {len(stream)} tokens: too few for seq_len {seq_len} with "
                            f"a held-out part of {eval_fraction}; use more text or a shorter trainer.seq_len")
        return cls(name, weight, stream, seq_len, train, held)

    def window(self, number: int) -> np.ndarray:
        start = number * self.seq_len
        return self.stream.read(start, start + self.seq_len + 1)

    def windows(self, numbers) -> np.ndarray:
        return np.stack([self.window(int(n)) for n in numbers]) if len(numbers) else \
            np.empty((0, self.seq_len + 1), np.int32)

    def train_window_numbers(self, samples: np.ndarray, seed: int, source: int) -> np.ndarray:
        """Window numbers of train samples: epoch e visits the train windows in the order keyed by e."""
        return _permuted(samples, self.n_train, (seed, 0, source), 0)

    def eval_window_numbers(self, samples: np.ndarray, seed: int, source: int) -> np.ndarray:
        return _permuted(samples, self.n_eval, (seed, 1, source), self.n_train + 1)

    @property
    def tokenizer(self) -> dict:
        return self.stream.index["tokenizer"]


class TokenData:
    """The data of a run: one source (`path`) or a weighted mixture (`sources`), cut for `seq_len`."""

    def __init__(self, path: str | None, seq_len: int, seed: int, eval_fraction: float = 0.05,
                 sources: list | None = None, tokenizer: str | None = None, mixture_block_steps: int = 0):
        if not 0 < eval_fraction < 1:
            raise UserError(f"data.eval_fraction must be in (0, 1), got {eval_fraction}")
        specs = _source_specs(path, sources)
        self.sources = [Source.open(name, p, w, seq_len, eval_fraction, tokenizer) for name, p, w in specs]
        self.seq_len, self.seed, self.block_steps = seq_len, seed, mixture_block_steps
        self._mixtures: dict[int, sampling.Mixture] = {}
        self.tokenizer = _one_tokenizer(self.sources)

    def check_vocab(self, vocab_size: int) -> None:
        """Every id of the tokenizer must index the model's embedding."""
        if self.tokenizer["vocab_size"] > vocab_size:
            raise UserError(f"the data's tokenizer has {self.tokenizer['vocab_size']} tokens but model.vocab_size is "
                            f"{vocab_size}; set model.vocab_size, or data.vocab=tokenizer (or pad128) to take it "
                            f"from the tokenizer")

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer["eos_id"])

    def save_tokenizer(self, run_dir: Path) -> None:
        """The tokenizer travels with the run: run_dir/tokenizer.json (what `launch.convert to-hf` exports)."""
        source = self.sources[0].stream.directory / tk.TOKENIZER_FILE
        if source.is_file() and not (Path(run_dir) / tk.TOKENIZER_FILE).exists():
            tk.write_atomic(Path(run_dir) / tk.TOKENIZER_FILE, source.read_text(encoding="utf-8"))

    def mixture(self, global_batch: int) -> sampling.Mixture:
        if global_batch not in self._mixtures:
            self._mixtures[global_batch] = sampling.Mixture([s.weight for s in self.sources], global_batch,
                                                            self.seed, self.block_steps)
        return self._mixtures[global_batch]

    def train_batch(self, step: int, global_batch: int, rows=None) -> np.ndarray:
        """int32 [rows, seq_len + 1]: rows `rows` (a slice or row numbers; default all) of step `step`'s
        global batch."""
        numbers = np.arange(global_batch)[rows if rows is not None else slice(None)]
        source, sample = self.mixture(global_batch).rows(step, numbers)
        out = np.empty((len(numbers), self.seq_len + 1), np.int32)
        for k in np.unique(source):
            sel = source == k
            src = self.sources[k]
            out[sel] = src.windows(src.train_window_numbers(sample[sel], self.seed, int(k)))
        return out

    def eval_batch(self, index: int, global_batch: int, source: int = 0, rows=None) -> np.ndarray:
        """Held-out batch `index` of one source (rows `rows` of it): windows training never reads."""
        src = self.sources[source]
        samples = index * global_batch + np.arange(global_batch)[rows if rows is not None else slice(None)]
        return src.windows(src.eval_window_numbers(samples, self.seed, source))

    def epochs(self, step: int, global_batch: int) -> dict[str, float]:
        """Epochs of each source completed after `step` steps (fractional)."""
        served = self.mixture(global_batch).samples_before(step)
        return {s.name: float(n) / s.n_train for s, n in zip(self.sources, served)}

    def bits_per_byte(self, loss: float, source: int = 0) -> float | None:
        """Loss (nats/token) as bits per UTF-8 byte of text: comparable across tokenizers."""
        bpt = self.sources[source].stream.bytes_per_token()
        return loss / math.log(2) / bpt if bpt > 0 else None

    def unigram_entropy(self, limit: int = 1 << 27) -> float:
        """The unigram baseline of the first source's train part (its first `limit` tokens at most)."""
        src = self.sources[0]
        return src.stream.unigram_entropy(min(src.n_train * self.seq_len + 1, limit))


def _permuted(samples: np.ndarray, count: int, key: tuple, offset: int) -> np.ndarray:
    """offset + the keyed permutation of range(count) for each sample's pass (sample // count)."""
    passes, within = np.divmod(np.asarray(samples, np.int64), count)
    out = np.empty_like(within)
    for p in np.unique(passes):
        sel = passes == p
        out[sel] = sampling.permute(within[sel], count, key + (int(p),))
    return out + offset


def _source_specs(path: str | None, sources: list | None) -> list[tuple[str, str, float]]:
    """[(name, path, weight)] from data.path or data.sources, with one-line errors for bad weights."""
    if sources and path:
        raise UserError(f"give data.path or data.sources, not both (data=mixture data.sources=[...] leaves "
                        f"data.path out; data.path is {path!r})")
    if not sources:
        if not path:
            raise UserError("give data.path (a dataset directory or builtin:python_docs) or data.sources")
        return [(_name(path), str(path), 1.0)]
    specs = []
    for i, s in enumerate(sources):
        if not isinstance(s, dict) or "path" not in s:
            raise UserError(f"data.sources[{i}] must be {{path: ..., weight: ...}}, got {s!r}")
        weight = s.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise UserError(f"data.sources[{i}].weight must be a number >= 0, got {weight!r}")
        specs.append((str(s.get("name") or _name(s["path"])), str(s["path"]), float(weight)))
    if sum(w for _, _, w in specs) <= 0:
        raise UserError("data.sources weights are all zero; give at least one source a positive weight")
    names = [n for n, _, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"data.sources have repeated names {names}; give each a distinct `name:`")
    return [s for s in specs if s[2] > 0]


def _name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1].replace("builtin:", "") or str(path)


def _one_tokenizer(sources: list[Source]) -> dict:
    first = sources[0].tokenizer
    for s in sources[1:]:
        if (s.tokenizer.get("sha256"), s.tokenizer.get("eos_id")) != (first.get("sha256"), first.get("eos_id")):
            raise UserError(f"data sources {sources[0].name!r} and {s.name!r} were tokenized differently; a "
                            f"mixture needs one tokenizer (rebuild them with the same --tokenizer)")
    return first


def resolve(path: str, tokenizer: str | None = None) -> Path:
    """A local dataset directory for data.path: builtin:NAME (built into the cache with `tokenizer`), an
    object-store URL (staged into the cache), or a directory (checked against `tokenizer` when given)."""
    path = str(path)
    if path.startswith("builtin:"):
        return builtin_dataset(path[len("builtin:"):], tokenizer)
    if path.startswith(("s3://", "gs://")):
        local = stage(path)
    else:
        local = Path(path)
        if not local.is_dir():
            hint = (" (a token file of an older trichip format: rebuild it with launch.prepare_data)"
                    if local.suffix == ".npy" else "")
            raise UserError(f"data.path {path!r} is not a dataset directory{hint}; make one with "
                            f"`python -m launch.prepare_data OUT_DIR INPUTS...` or use builtin:python_docs")
    _check_tokenizer(local, tokenizer)
    return local


def _check_tokenizer(directory: Path, tokenizer: str | None) -> None:
    """data.tokenizer, when given for a prepared dataset, must be the one the dataset was made with."""
    if tokenizer in (None, ""):
        return
    recorded = ds.read_index(directory)["tokenizer"]
    kind, arg = tk.parse_spec(tokenizer)
    if kind == "train-bpe" and recorded.get("trained") == tokenizer:
        return
    wanted = tk.load(tokenizer).sha256 if kind != "train-bpe" else tokenizer
    if wanted != recorded.get("sha256"):
        raise UserError(f"data.tokenizer={tokenizer} is not the tokenizer {directory} was made with "
                        f"({recorded.get('kind')}, {str(recorded.get('sha256'))[:12]}); drop data.tokenizer or "
                        f"rebuild the dataset with it")


def builtin_dataset(name: str, tokenizer: str | None = None) -> Path:
    """The shipped corpus as a dataset in the cache, tokenized once per tokenizer. Built in a temporary
    directory and renamed, so processes starting together never see half of it."""
    from trainer.prepare import Options, build
    if name not in BUILTIN:
        raise UserError(f"unknown built-in corpus {name!r}; built-ins are {sorted(BUILTIN)}")
    spec = tokenizer or "bytes"
    kind, arg = tk.parse_spec(spec)
    tag = {"bytes": "bytes", "train-bpe": f"bpe{arg}"}.get(kind) or f"hf-{tk.load(spec).sha256[:16]}"
    out = cache_dir() / "datasets" / f"{name}-{tag}"
    if (out / ds.INDEX).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}.tmp-")) / "dataset"
    build(tmp, Options(tokenizer=spec, inputs=[str(BUILTIN[name])], workers=1, progress=False))
    try:
        tmp.rename(out)
    except OSError:
        if not (out / ds.INDEX).exists():
            raise
    shutil.rmtree(tmp.parent, ignore_errors=True)   # empty, or another process finished first
    return out


def builtin_text(name: str) -> str:
    with gzip.open(BUILTIN[name], "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def stage(url: str) -> Path:
    """An object-store dataset copied into the cache: the index, the tokenizer, then each shard not yet
    staged, downloaded to a temporary name, checked against the index's size and SHA-256, and renamed.
    Processes staging the same dataset at once take turns (a lock file in the cache)."""
    from trainer.storage.location import StoreDir, storage_errors
    remote = StoreDir(url)
    local = cache_dir() / "remote-data" / hashlib.sha256(remote.url.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".stage.lock", "w") as lock, storage_errors("read the dataset", remote.url):
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            raw = remote.read_bytes(ds.INDEX)
        except FileNotFoundError:
            raise UserError(f"{remote.url} is not a dataset (no {ds.INDEX})") from None
        index = ds.parse_index(raw, f"{remote.url}/{ds.INDEX}")
        if remote.exists(tk.TOKENIZER_FILE):
            _download(remote, tk.TOKENIZER_FILE, local / tk.TOKENIZER_FILE)
        for entry in index.get("shards", []):
            _stage_shard(remote, local, entry)
        ds.write_index(local, index)
    return local


def _download(remote, name: str, target: Path) -> Path:
    tmp = target.with_name(target.name + ".part")
    remote.store.download_file(remote.join_key(name), tmp)
    os.replace(tmp, target)
    return target


def _stage_shard(remote, local: Path, entry: dict) -> None:
    target = local / entry["file"]
    marker = local / (entry["file"] + ".sha256")
    if target.exists() and marker.exists() and marker.read_text() == entry["sha256"]:
        return
    tmp = local / (entry["file"] + ".part")
    remote.store.download_file(remote.join_key(entry["file"]), tmp)
    got = ds.file_sha256(tmp)
    if got != entry["sha256"] or tmp.stat().st_size != entry["bytes"]:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{remote.url}/{entry['file']} does not match its index (SHA-256 {got[:12]} vs "
                           f"{entry['sha256'][:12]}): the dataset on the store is damaged or being rewritten")
    os.replace(tmp, target)
    tk.write_atomic(marker, entry["sha256"])
