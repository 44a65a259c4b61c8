import numpy as np
import pytest

from hal import UserError
from trainer.data import EOS, TokenData, builtin_token_file, decode, encode, write_token_file
from trainer.schedule import learning_rate


def test_byte_tokenizer_round_trip():
    text = "naïve café — ok\n"
    assert decode(encode(text)) == text
    assert encode("A").tolist() == [65]


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    path = builtin_token_file("python_docs")
    a = TokenData(str(path), seq_len=64, seed=7, vocab_size=257)
    b = TokenData(str(path), seq_len=64, seed=7, vocab_size=257)
    c = TokenData(str(path), seq_len=64, seed=8, vocab_size=257)
    assert np.array_equal(a.train_batch(123, 8), b.train_batch(123, 8))          # no hidden cursor
    assert not np.array_equal(a.train_batch(123, 8), a.train_batch(124, 8))
    assert not np.array_equal(a.train_batch(123, 8), c.train_batch(123, 8))
    batch = a.train_batch(5, 8)
    assert batch.shape == (8, 65) and batch.dtype == np.int32 and batch.max() <= EOS


def test_held_out_split_is_never_trained_on():
    data = TokenData("builtin:python_docs", seq_len=32, seed=0, vocab_size=257)
    tokens = np.asarray(data.tokens)
    # windows are contiguous slices; locate them by their offsets
    for step in range(50):
        rng = np.random.default_rng([0, 0, step])
        starts = rng.integers(0, data.split - 33, size=4, endpoint=True)
        assert (starts + 33 <= data.split).all()
        np.testing.assert_array_equal(data.train_batch(step, 4)[0], tokens[starts[0]:starts[0] + 33])
    ev = np.random.default_rng([0, 1, 0]).integers(data.split, len(tokens) - 33, size=4, endpoint=True)
    assert (ev >= data.split).all()


def test_token_file_errors(tmp_path):
    with pytest.raises(UserError, match="no text"):
        write_token_file(tmp_path / "e.npy", [b"", ""])
    path = write_token_file(tmp_path / "t.npy", ["hello world " * 20])
    with pytest.raises(UserError, match="too few"):
        TokenData(str(path), seq_len=512, seed=0, vocab_size=257)
    with pytest.raises(UserError, match="vocab_size"):
        TokenData(str(path), seq_len=8, seed=0, vocab_size=200)
    (tmp_path / "junk.npy").write_bytes(b"\x00\x01 not numpy")
    with pytest.raises(UserError, match="not a token file"):
        TokenData(str(tmp_path / "junk.npy"), seq_len=8, seed=0, vocab_size=257)


def test_schedule_warmup_then_cosine():
    kw = dict(peak_lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, **kw) == pytest.approx(1e-4)       # the first update is not wasted at lr 0
    assert learning_rate(9, **kw) == pytest.approx(1e-3)
    assert learning_rate(10, **kw) == pytest.approx(1e-3)
    assert learning_rate(60, **kw) == pytest.approx(0.55e-3)   # half-way down the cosine
    assert learning_rate(110, **kw) == pytest.approx(1e-4)
    assert learning_rate(500, **kw) == pytest.approx(1e-4)
    lrs = [learning_rate(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(50, **dict(kw, schedule="linear")) == pytest.approx(1e-3 - 0.9e-3 * 0.4)
