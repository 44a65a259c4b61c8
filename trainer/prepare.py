"""Build a token dataset (trainer.dataset) from text files, directories, `.gz`, JSONL and Parquet.

Documents are tokenized in chunks that never span two input files, by worker processes when asked,
in input order, and appended to shards with an end-of-document token after each document. After each
shard the index records where the input stopped (file, document), so a rerun of the same command after
a crash resumes there; a rerun with other inputs or settings is refused.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import queue
import shutil
import threading
import zlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import UserError
from trainer import dataset as ds
from trainer import tokenizer as tk

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
CHUNK_DOCS, CHUNK_BYTES = 4096, 8 << 20


@dataclass
class Options:
    tokenizer: str = "bytes"             # bytes | a tokenizer.json file or directory | train-bpe:N
    eos_token: str | None = None
    field: str = "text"                  # the JSONL field holding a document
    column: str = "text"                 # the Parquet column holding a document
    on_missing: str = "error"            # a JSONL line / Parquet row without the document: error | skip
    shard_tokens: int = 1 << 27
    workers: int = 1
    progress: bool = True
    inputs: list = dataclasses.field(default_factory=list)


def input_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def expand_inputs(inputs) -> list[Path]:
    """Files as given (any name is read as text unless it is JSONL/Parquet), directories walked for the
    suffixes above, in sorted order."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(f for f in item.rglob("*") if f.is_file() and input_kind(f))
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"input {item} does not exist")
    if not files:
        raise UserError(f"no input files in {[str(i) for i in inputs]} (directories are searched for "
                        f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)}, optionally .gz)")
    return files


def documents(path: Path, opts: Options, missing: list):
    """The documents of one input file, in order; `missing` collects (file, line/row) of skipped ones."""
    kind = input_kind(path) or "text"
    if kind == "parquet":
        yield from _parquet_documents(path, opts, missing)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            if kind == "text":
                yield f.read().decode("utf-8", errors="replace")
                return
            for number, line in enumerate(f, 1):
                if line.strip():
                    text = _jsonl_document(path, number, line, opts)
                    if text is None:
                        missing.append(f"{path}:{number}")
                    else:
                        yield text
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _jsonl_document(path: Path, number: int, line: bytes, opts: Options) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        raise UserError(f"{path}:{number} is not a JSON line") from None
    text = record.get(opts.field) if isinstance(record, dict) else None
    if isinstance(text, str):
        return text
    if opts.on_missing == "skip":
        return None
    raise UserError(f"{path}:{number} has no string field {opts.field!r} (name the field with --field, or "
                    f"skip such lines with --on-missing skip)")


def _parquet_documents(path: Path, opts: Options, missing: list):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs pyarrow: pip install 'trichip[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:   # pyarrow raises ArrowInvalid and friends for a file that is not Parquet
        raise UserError(f"{path} is not a Parquet file: {str(e).splitlines()[0][:200]}") from None
    if opts.column not in pf.schema_arrow.names:
        raise UserError(f"{path} has no column {opts.column!r} (its columns: {pf.schema_arrow.names}); name the "
                        f"column with --column")
    row = 0
    for batch in pf.iter_batches(columns=[opts.column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield text
            elif opts.on_missing == "skip":
                missing.append(f"{path}:row {row}")
            else:
                raise UserError(f"{path} row {row} has no string in column {opts.column!r} (skip such rows "
                                f"with --on-missing skip)")


def chunks(files: list[Path], opts: Options, start: tuple[int, int], missing: list):
    """(file index, documents done in that file after the chunk, [texts]) from position `start` on."""
    first_file, first_doc = start
    for fi in range(first_file, len(files)):
        batch, size, done = [], 0, 0
        for di, text in enumerate(documents(files[fi], opts, missing)):
            if fi == first_file and di < first_doc:
                continue
            batch.append(text)
            size += len(text)
            done = di + 1
            if len(batch) >= CHUNK_DOCS or size >= CHUNK_BYTES:
                yield fi, done, batch
                batch, size = [], 0
        if batch:
            yield fi, done, batch
        elif fi != first_file or first_doc == 0:
            yield fi, done, []                   # an empty file still moves the position past it


_worker_tok: tk.Tokenizer | None = None


def _init_worker(spec: str, eos_token: str | None) -> None:
    global _worker_tok
    _worker_tok = tk.load(spec, eos_token)


def _encode(tok: tk.Tokenizer, texts: list[str]) -> tuple[np.ndarray, int, int]:
    """Packed tokens (each document followed by EOS, empty documents dropped), documents, UTF-8 bytes."""
    parts, docs, nbytes = [], 0, 0
    eos = np.array([tok.eos_id], np.uint32)
    for text, ids in zip(texts, tok.encode_batch(texts)):
        if len(ids):
            parts += [ids, eos]
            docs += 1
            nbytes += len(text.encode("utf-8"))
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint32)), docs, nbytes


def _encode_in_worker(item):
    fi, done, texts = item
    return (fi, done) + _encode(_worker_tok, texts)


def fingerprint(files: list[Path], opts: Options, tok: tk.Tokenizer) -> dict:
    """What makes two runs of prepare_data the same dataset: inputs (path, size, mtime) and settings."""
    return {"inputs": [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                       for f in files],
            "tokenizer": opts.tokenizer if opts.tokenizer.startswith("train-bpe:") else tok.sha256,
            "eos_id": tok.eos_id, "field": opts.field, "column": opts.column, "on_missing": opts.on_missing,
            "shard_tokens": opts.shard_tokens}


def build(out: str | os.PathLike, opts: Options) -> dict:
    """Write (or finish) the dataset OUT from opts.inputs; returns its index."""
    out = Path(out)
    created = not out.exists()
    try:
        return _build(out, opts)
    except UserError:
        if created:                 # bad input found part way: leave nothing half-written behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _build(out: Path, opts: Options) -> dict:
    files = expand_inputs(opts.inputs)
    if opts.on_missing not in ("error", "skip"):
        raise UserError(f"--on-missing must be error or skip, not {opts.on_missing!r}")
    if opts.shard_tokens < 1:
        raise UserError("--shard-tokens must be positive")
    index = _existing(out)
    tok = _tokenizer(out, files, opts, index)
    fp = fingerprint(files, opts, tok)
    if index is not None:
        if index.get("fingerprint") != fp:
            raise UserError(f"{out} already holds a dataset made from other inputs or settings; write to a new "
                            f"directory or remove {out}")
        if index.get("complete"):
            return index
        _remove_partial_shards(out)
    else:
        if not opts.tokenizer.startswith("train-bpe:"):      # train-bpe:N saved it as it trained
            tok.save(out)
        index = _new_index(tok, fp, files)
        ds.write_index(out, index)
    return _write_shards(out, files, opts, tok, index)


def _existing(out: Path) -> dict | None:
    if (out / ds.INDEX).exists():
        return ds.read_index(out)
    if out.exists() and (not out.is_dir() or any(p.name != tk.TOKENIZER_FILE for p in out.iterdir())):
        raise UserError(f"{out} exists and is not a dataset directory; write to a new directory")
    out.mkdir(parents=True, exist_ok=True)
    return None


def _remove_partial_shards(out: Path) -> None:
    """A crashed writer's temporary shard files (never in the index)."""
    for tmp in out.glob("shard-*.npy.*.tmp"):
        tmp.unlink(missing_ok=True)


def _tokenizer(out: Path, files: list[Path], opts: Options, index: dict | None) -> tk.Tokenizer:
    """The dataset's tokenizer, saved as OUT/tokenizer.json (trained first for train-bpe:N)."""
    kind, arg = tk.parse_spec(opts.tokenizer)
    if kind == "train-bpe":
        if index is not None or (out / tk.TOKENIZER_FILE).exists():
            return tk.HFTokenizer(out / tk.TOKENIZER_FILE, tk.BPE_EOS)
        texts = (t for f in files for t in documents(f, opts, []))
        return tk.train_bpe(arg, texts, out)
    return tk.load(opts.tokenizer, opts.eos_token)


def _new_index(tok: tk.Tokenizer, fp: dict, files: list[Path]) -> dict:
    ident = dict(tok.identity(), trained=fp["tokenizer"] if str(fp["tokenizer"]).startswith("train-bpe:") else None)
    return {"format": ds.FORMAT, "version": ds.VERSION, "complete": False, "tokenizer": ident,
            "dtype": ds.token_dtype(tok.vocab_size).name, "shards": [], "tokens": 0, "documents": 0,
            "text_bytes": 0, "skipped": [], "resume": {"file": 0, "document": 0}, "fingerprint": fp,
            "sources": [str(f) for f in files]}


def _write_shards(out: Path, files: list[Path], opts: Options, tok: tk.Tokenizer, index: dict) -> dict:
    dtype = np.dtype(index["dtype"])
    missing = list(index["skipped"])
    buffered, docs, nbytes = [], 0, 0
    position = (index["resume"]["file"], index["resume"]["document"])
    work = chunks(files, opts, position, missing)
    spec = "bytes" if tok.kind == "bytes" else str(out / tk.TOKENIZER_FILE)
    eos = tok.eos_token() if isinstance(tok, tk.HFTokenizer) else None
    with _encoder(opts, spec, eos) as encode, _progress(opts, index) as bar:
        for fi, done, tokens, n_docs, n_bytes in encode(work):
            buffered.append(tokens.astype(dtype))
            docs, nbytes, position = docs + n_docs, nbytes + n_bytes, (fi, done)
            bar.update(n_docs)
            if sum(len(b) for b in buffered) >= opts.shard_tokens:
                _flush(out, index, buffered, docs, nbytes, position, missing)
                buffered, docs, nbytes = [], 0, 0
    if any(len(b) for b in buffered) or docs:
        _flush(out, index, buffered, docs, nbytes, position, missing)
    if index["tokens"] == 0:
        raise UserError(f"no text to tokenize in {[str(f) for f in files]} (the inputs are empty)")
    index["complete"] = True
    index["skipped"] = list(dict.fromkeys(missing))
    ds.write_index(out, index)
    return index


def _flush(out: Path, index: dict, buffered: list, docs: int, nbytes: int, position, missing: list) -> None:
    tokens = np.concatenate(buffered) if buffered else np.zeros(0, np.dtype(index["dtype"]))
    if len(tokens):
        index["shards"].append(ds.write_shard(out, len(index["shards"]), tokens, docs))
    index["tokens"] += int(len(tokens))
    index["documents"] += docs
    index["text_bytes"] += nbytes
    index["skipped"] = list(dict.fromkeys(missing))   # a resumed run meets the skipped ones before it again
    index["resume"] = {"file": position[0], "document": position[1]}
    ds.write_index(out, index)


class _encoder:
    """Tokenize chunks in order: in this process, or in `workers` spawned processes."""

    def __init__(self, opts: Options, spec: str, eos_token: str | None):
        self.opts, self.spec, self.eos_token, self.pool = opts, spec, eos_token, None

    def __enter__(self):
        if self.opts.workers <= 1:
            tok = tk.load(self.spec, self.eos_token)
            return lambda work: ((fi, done) + _encode(tok, texts) for fi, done, texts in _prefetch(work))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # one thread per worker process
        self.pool = multiprocessing.get_context("spawn").Pool(self.opts.workers, _init_worker,
                                                              (self.spec, self.eos_token))
        return lambda work: self.pool.imap(_encode_in_worker, work, chunksize=1)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        return False


def _prefetch(items, depth: int = 2):
    """`items`, produced by a thread up to `depth` ahead: reading and parsing the next chunk overlaps the
    tokenizer (which releases the GIL) on this one. The producer's exceptions are raised here, in order."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, None))
            q.put((done, None))
        except BaseException as e:     # noqa: BLE001  (handed to the consumer, which raises it)
            q.put((done, e))

    thread = threading.Thread(target=produce, name="prepare-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():       # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


class _progress:
    def __init__(self, opts: Options, index: dict):
        self.opts, self.index, self.bar = opts, index, None

    def __enter__(self):
        from tqdm import tqdm
        self.bar = tqdm(desc="tokenizing", unit=" docs", initial=self.index["documents"],
                        disable=None if self.opts.progress else True, mininterval=1.0)   # None: off when not a terminal
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()
        return False
