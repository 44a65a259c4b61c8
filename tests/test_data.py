"""The data layer: tokenizers, token datasets, windows without replacement, mixtures, per-process rows."""
import json

import numpy as np
import pytest

from hal import UserError
from trainer import dataset as ds
from trainer import sampling
from trainer import tokenizer as tk
from trainer.data import TokenData
from trainer.prepare import Options, build

TEXT = "naïve café — ok\n\tTabs, 🙂 emoji and plain ASCII. " * 3


def positions_dataset(path, n, shards=3):
    """A dataset whose token i is the number i (vocab n), in `shards` shards: every row shows where it was read."""
    path.mkdir(parents=True)
    tokens = np.arange(n, dtype=ds.token_dtype(n))
    entries = [ds.write_shard(path, i, part, 1) for i, part in enumerate(np.array_split(tokens, shards))]
    ds.write_index(path, {"format": ds.FORMAT, "version": ds.VERSION, "complete": True, "dtype": tokens.dtype.name,
                          "tokenizer": {"kind": "positions", "sha256": "positions", "vocab_size": n, "eos_id": 0},
                          "shards": entries, "tokens": n, "documents": shards, "text_bytes": n})
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    return tk.train_bpe(400, [TEXT * 20, "the quick brown fox jumps over the lazy dog " * 50], d)


def test_each_tokenizer_kind_round_trips_text(tmp_path, bpe):
    byte = tk.Tokenizer()
    assert byte.decode(byte.encode_batch([TEXT])[0]) == TEXT
    assert byte.encode_batch(["A"])[0].tolist() == [65]
    assert bpe.decode(bpe.encode_batch([TEXT])[0]) == TEXT
    assert len(bpe.encode_batch([TEXT])[0]) < len(TEXT.encode())          # it learned merges
    assert bpe.eos_id == bpe.tok.token_to_id(tk.BPE_EOS)
    # the byte tokenizer's tokenizer.json (its Hugging Face export) gives the same ids as the bytes
    byte.save(tmp_path)
    as_hf = tk.HFTokenizer(tmp_path)
    assert np.array_equal(as_hf.encode_batch([TEXT])[0], byte.encode_batch([TEXT])[0])
    assert (as_hf.vocab_size, as_hf.eos_id) == (257, 256)


def test_a_tokenizer_file_is_checked(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        tk.load(str(tmp_path / "none.json"))
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(UserError, match="not a Hugging Face tokenizer.json"):
        tk.load(str(tmp_path))
    with pytest.raises(UserError, match="train-bpe takes a vocabulary size"):
        tk.parse_spec("train-bpe:lots")


def test_a_tokenizer_without_a_known_eos_names_the_option(tmp_path):
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="--eos-token"):
        tk.load(str(tmp_path))
    assert tk.load(str(tmp_path), eos_token="[UNK]").eos_id == 1


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = TokenData("builtin:python_docs", 64, 7), TokenData("builtin:python_docs", 64, 7)
    c = TokenData("builtin:python_docs", 64, 8)
    assert np.array_equal(a.train_batch(123, 8), b.train_batch(123, 8))          # no hidden cursor
    assert not np.array_equal(a.train_batch(123, 8), a.train_batch(124, 8))
    assert not np.array_equal(a.train_batch(123, 8), c.train_batch(123, 8))
    batch = a.train_batch(5, 8)
    assert batch.shape == (8, 65) and batch.dtype == np.int32 and batch.max() <= 256


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_is_a_permutation_for_every_size(n):
    out = sampling.permute(np.arange(n), n, (3, 1, 4))
    assert sorted(out.tolist()) == list(range(n))
    if n > 64:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, sampling.permute(np.arange(n), n, (3, 1, 5)))
    assert int(sampling.permute(n - 1, n, (3, 1, 4))) == out[-1]                # per index, same answer


@pytest.mark.parametrize("eval_fraction", [0.05, 0.25])
def test_an_epoch_visits_every_train_window_once_and_never_a_held_out_one(tmp_path, eval_fraction):
    """Token i is the number i: train windows are whole windows stepping by seq_len, each seen once per
    epoch (three epochs, three orders), and the held-out windows share no token with them."""
    n, seq = 4000, 32
    data = TokenData(str(positions_dataset(tmp_path / "d", n)), seq, 0, eval_fraction)
    src = data.sources[0]
    assert src.n_train + 1 + src.n_eval == (n - 1) // seq
    rows = np.concatenate([data.train_batch(s, 8) for s in range(-(-3 * src.n_train // 8))])[: 3 * src.n_train]
    assert (np.diff(rows, axis=1) == 1).all() and (rows[:, 0] % seq == 0).all()
    starts = rows[:, 0] // seq
    epochs = [starts[e * src.n_train:(e + 1) * src.n_train] for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(src.n_train))
    assert not np.array_equal(epochs[0], epochs[1])
    held = np.concatenate([data.eval_batch(i, 8) for i in range(-(-src.n_eval // 8))])
    assert np.intersect1d(rows, held).size == 0
    assert sorted(set((held[:, 0] // seq).tolist())) == list(range(src.n_train + 1, src.n_train + 1 + src.n_eval))
    assert data.epochs(src.n_train // 8, 8)["d"] == pytest.approx((src.n_train // 8) * 8 / src.n_train)


def test_windows_are_the_documented_function_of_seed_and_step(tmp_path):
    """Row r of step s is train sample s*B + r: window permute(sample mod W, W, (seed, 0, 0, epoch)) — the
    data order a resumed run relies on (the trainer.data docstring)."""
    data = TokenData(str(positions_dataset(tmp_path / "d", 3000)), 16, 5)
    w = data.sources[0].n_train
    for step in (0, 7, w // 4 + 3):
        samples = step * 4 + np.arange(4)
        want = [int(sampling.permute(s % w, w, (5, 0, 0, s // w))) * 16 for s in samples]
        assert data.train_batch(step, 4)[:, 0].tolist() == want


def test_rows_of_a_batch_are_read_alone(tmp_path):
    """A process asks for its rows only and gets exactly those rows of the global batch."""
    data = TokenData(str(positions_dataset(tmp_path / "d", 3000)), 16, 1)
    full = data.train_batch(9, 8)
    assert np.array_equal(np.concatenate([data.train_batch(9, 8, slice(0, 4)), data.train_batch(9, 8, slice(4, 8))]),
                          full)


def test_mixture_proportions_are_exact_in_every_block(tmp_path):
    a = positions_dataset(tmp_path / "a", 3000)
    b = positions_dataset(tmp_path / "b", 5000)
    data = TokenData(None, 16, 0, sources=[{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}])
    mix = data.mixture(8)
    assert mix.block_steps == 5 and mix.counts.tolist() == [28, 12]             # 40 rows: 70% / 30% exactly
    for block in range(6):
        sources = np.concatenate([mix.rows(s, np.arange(8))[0] for s in range(block * 5, block * 5 + 5)])
        assert np.bincount(sources).tolist() == [28, 12]
    # each source's samples run on without gaps or repeats
    rows = [mix.rows(s, np.arange(8)) for s in range(30)]
    for k in (0, 1):
        samples = np.concatenate([n[s == k] for s, n in rows])
        assert sorted(samples.tolist()) == list(range(len(samples)))
    epochs = data.epochs(30, 8)
    assert epochs["a"] == pytest.approx(28 * 6 / data.sources[0].n_train)


def test_mixture_weights_without_an_exact_short_block_are_apportioned():
    mix = sampling.Mixture([1 / 3, 2 / 3], 4, 0, block_steps=0)
    assert mix.block_steps == 3 and mix.counts.tolist() == [4, 8]
    odd = sampling.Mixture([0.123, 0.877], 16, 0, block_steps=10)
    assert odd.counts.sum() == 160 and abs(odd.counts[0] - 0.123 * 160) < 1


@pytest.mark.parametrize("sources,needle", [
    ([{"path": "A", "weight": -1}], "weight must be a number >= 0"),
    ([{"path": "A", "weight": 0}, {"path": "B", "weight": 0.0}], "all zero"),
    ([{"weight": 1}], "must be {path"),
    ([{"path": "A", "name": "x"}, {"path": "B", "name": "x"}], "repeated names"),
])
def test_bad_mixtures_are_one_line_errors(sources, needle):
    with pytest.raises(UserError, match=needle) as e:
        TokenData(None, 16, 0, sources=sources)
    assert "\n" not in str(e.value)


def test_a_mixture_needs_one_tokenizer(tmp_path, bpe):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 200)
    build(tmp_path / "bytes", Options(inputs=[str(text)], progress=False))
    build(tmp_path / "bpe", Options(tokenizer=str(bpe.path), inputs=[str(text)], progress=False))
    with pytest.raises(UserError, match="tokenized differently"):
        TokenData(None, 8, 0, sources=[{"path": str(tmp_path / "bytes")}, {"path": str(tmp_path / "bpe")}])


def test_dataset_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not a dataset directory"):
        TokenData(str(tmp_path / "missing"), 8, 0)
    with pytest.raises(UserError, match="older trichip format"):
        TokenData(str(tmp_path / "old.npy"), 8, 0)
    d = positions_dataset(tmp_path / "d", 300)
    with pytest.raises(UserError, match="too few"):
        TokenData(str(d), 512, 0)
    data = TokenData(str(d), 8, 0)
    with pytest.raises(UserError, match="model.vocab_size is 257"):
        data.check_vocab(257)
    # a shard whose size disagrees with the index
    shard = d / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="shard .* has .* bytes but .* says"):
        TokenData(str(d), 8, 0)
    (d / ds.INDEX).write_text("{oops")
    with pytest.raises(UserError, match="is not JSON"):
        TokenData(str(d), 8, 0)


def test_an_unfinished_dataset_is_refused(tmp_path):
    d = positions_dataset(tmp_path / "d", 300)
    index = json.loads((d / ds.INDEX).read_text())
    ds.write_index(d, dict(index, complete=False))
    with pytest.raises(UserError, match="still being written"):
        TokenData(str(d), 8, 0)


def test_data_tokenizer_must_match_the_dataset(tmp_path, bpe):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 100)
    build(tmp_path / "ds", Options(inputs=[str(text)], progress=False))
    TokenData(str(tmp_path / "ds"), 8, 0, tokenizer="bytes")
    with pytest.raises(UserError, match="not the tokenizer"):
        TokenData(str(tmp_path / "ds"), 8, 0, tokenizer=str(bpe.path))


def test_bits_per_byte_counts_text_bytes(tmp_path, bpe):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 300)
    build(tmp_path / "b", Options(inputs=[str(text)], progress=False))
    build(tmp_path / "p", Options(tokenizer=str(bpe.path), inputs=[str(text)], progress=False))
    byte, pieces = TokenData(str(tmp_path / "b"), 8, 0), TokenData(str(tmp_path / "p"), 8, 0)
    nbytes = len((TEXT * 300).encode())
    assert byte.sources[0].stream.bytes_per_token() == pytest.approx(nbytes / (nbytes + 1))
    ratio = nbytes / len(pieces.sources[0].stream)
    assert pieces.bits_per_byte(2.0) == pytest.approx(2.0 / np.log(2) / ratio)


def test_a_refused_rerun_leaves_the_dataset_and_a_custom_eos_survives(tmp_path):
    """A rerun into a dataset with another tokenizer is refused and changes nothing; a dataset made with a
    custom end-of-document token keeps it (index, mixtures, the tokenizer a run exports)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["hello", "world", "[UNK]", "<|im_end|>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "custom").mkdir()
    tok.save(str(tmp_path / "custom" / "tokenizer.json"))
    (tmp_path / "t.txt").write_text("hello world " * 300)
    build(tmp_path / "ds", Options(inputs=[str(tmp_path / "t.txt")], progress=False))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    with pytest.raises(UserError, match="other inputs or settings"):
        build(tmp_path / "ds", Options(tokenizer=str(tmp_path / "custom"), eos_token="<|im_end|>",
                                       inputs=[str(tmp_path / "t.txt")], progress=False))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before
    build(tmp_path / "c", Options(tokenizer=str(tmp_path / "custom"), eos_token="<|im_end|>",
                                  inputs=[str(tmp_path / "t.txt")], progress=False))
    data = TokenData(str(tmp_path / "c"), 8, 0)
    assert data.eos_id == 3 and data.train_batch(0, 2).max() <= 3
    assert tk.for_checkpoint(data.tokenizer, tmp_path / "c").eos_id == 3
