"""Tokenizers: UTF-8 bytes, a Hugging Face `tokenizer.json`, or a byte-level BPE trained offline.

Every tokenizer has an identity (kind and the SHA-256 of its `tokenizer.json`) that datasets and
checkpoints record, an end-of-document id, and a `tokenizer.json` that `launch.convert to-hf` exports
beside the weights. The `tokenizers` package does the work; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from models.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
BPE_EOS = "<|endoftext|>"
# End-of-document tokens of common tokenizers, first match wins: Llama 3, GPT-2 / trained BPE, Llama 2 /
# Mistral, Gemma.
EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")


class Tokenizer:
    """Byte-level: the UTF-8 bytes are the ids 0..255, 256 ends a document."""
    kind = "bytes"
    vocab_size = 257
    eos_id = 256
    sha256 = "bytes"

    def identity(self) -> dict:
        return {"kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.uint32) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(t) for t in ids if 0 <= int(t) < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """The same tokenizer as a Hugging Face `tokenizer.json`: a byte-level BPE without merges whose
        vocabulary lists the 256 byte symbols in byte order, so id == byte value, and EOS at 256."""
        from tokenizers import decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTok
        alphabet = _byte_symbols()
        tok = HFTok(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([BPE_EOS])
        return tok.to_str()

    def save(self, directory: Path) -> Path:
        return write_atomic(Path(directory) / TOKENIZER_FILE, self.to_json())


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` (Llama 3, Mistral, GPT-2 style BPE, or one trained by `train_bpe`)."""
    kind = "hf"

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer as HFTok
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"tokenizer {str(path)!r} does not exist: give a tokenizer.json file, a directory "
                            f"holding one, bytes, or train-bpe:N")
        self.text = path.read_text(encoding="utf-8")
        try:
            self.tok = HFTok.from_str(self.text)
        except Exception as e:   # the tokenizers package raises its own Exception type on a bad file
            raise UserError(f"{path} is not a Hugging Face tokenizer.json: {str(e).splitlines()[0][:200]}") from None
        self.path = path
        self.sha256 = hashlib.sha256(self.text.encode("utf-8")).hexdigest()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = int(eos_id) if eos_id is not None else self._eos(eos_token)

    def _eos(self, eos_token: str | None) -> int:
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        for name in names:
            i = self.tok.token_to_id(name)
            if i is not None:
                return int(i)
        raise UserError(f"{self.path} has no end-of-document token among {list(names)}; name the one it uses "
                        f"with `python -m launch.prepare_data ... --eos-token TOKEN`")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.uint32) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        return self.text

    def eos_token(self) -> str:
        return self.tok.id_to_token(self.eos_id)


def train_bpe(vocab_size: int, texts, out_dir: str | os.PathLike) -> HFTokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (EOS included) on an iterator of texts and save it as
    OUT_DIR/tokenizer.json."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers
    if vocab_size < 257 + 1:
        raise UserError(f"train-bpe:{vocab_size}: a byte-level BPE needs more than 257 tokens (256 bytes and EOS)")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path = write_atomic(Path(out_dir) / TOKENIZER_FILE, tok.to_str())
    return HFTokenizer(path, BPE_EOS)


def parse_spec(spec: str | None) -> tuple[str, object]:
    """`bytes` | `train-bpe:N` | a path -> (kind, argument); one-line errors for anything else."""
    spec = "bytes" if spec in (None, "", "bytes") else str(spec)
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("train-bpe:"):
        n = spec[len("train-bpe:"):]
        if not n.isdigit():
            raise UserError(f"tokenizer {spec!r}: train-bpe takes a vocabulary size, e.g. train-bpe:4096")
        return "train-bpe", int(n)
    return "file", spec


def load(spec: str | None, eos_token: str | None = None) -> Tokenizer:
    """A tokenizer from `bytes` or a tokenizer.json path (train-bpe is made by prepare_data, not loaded)."""
    kind, arg = parse_spec(spec)
    if kind == "bytes":
        return Tokenizer()
    if kind == "train-bpe":
        raise UserError(f"tokenizer {spec!r} is trained by `python -m launch.prepare_data`; the trainer takes "
                        f"the dataset it wrote (its tokenizer.json lies beside the shards)")
    return HFTokenizer(arg, eos_token)


def from_identity(ident: dict, directory: Path) -> Tokenizer:
    """The tokenizer a dataset or checkpoint recorded, from the tokenizer.json stored beside it."""
    if ident.get("kind") == "bytes":
        return Tokenizer()
    tok = HFTokenizer(Path(directory) / TOKENIZER_FILE, eos_id=ident.get("eos_id"))
    if tok.sha256 != ident.get("sha256"):
        raise UserError(f"{Path(directory) / TOKENIZER_FILE} is not the tokenizer {directory} records "
                        f"(SHA-256 {tok.sha256[:12]} vs {str(ident.get('sha256'))[:12]}); restore the original file")
    return tok


def padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    return -(-vocab_size // multiple) * multiple


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: the symbol the ByteLevel pre-tokenizer gives byte b, for b in 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_atomic(path: Path, text: str) -> Path:
    from trainer.dataset import write_atomic as write_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, text.encode("utf-8"))
    return path


def tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json for transformers' AutoTokenizer (a fast tokenizer over tokenizer.json)."""
    eos = tok.eos_token() if isinstance(tok, HFTokenizer) else BPE_EOS
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None,
            "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}


def for_checkpoint(ident: dict | None, run_dir: Path | None) -> Tokenizer | None:
    """The tokenizer a checkpoint was trained with (its manifest's data.tokenizer), from the run dir's
    tokenizer.json when it is not the byte tokenizer; None when it cannot be found there."""
    if not ident or ident.get("kind") == "bytes":
        return Tokenizer() if ident else None
    if run_dir is None or not (Path(run_dir) / TOKENIZER_FILE).is_file():
        return None
    return from_identity(ident, Path(run_dir))


def export(tok: Tokenizer, out_dir: str | os.PathLike) -> None:
    """Write tokenizer.json and tokenizer_config.json into OUT_DIR (the Hugging Face export)."""
    out = Path(out_dir)
    write_atomic(out / TOKENIZER_FILE, tok.to_json())
    write_atomic(out / "tokenizer_config.json", json.dumps(tokenizer_config(tok), indent=1))
