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


@pytest.mark.parametrize("eval_fraction", [0.05, 0.25])
def test_held_out_split_is_never_trained_on(tmp_path, eval_fraction):
    """Token i of the file is the number i, so every batch row shows where in the file it was read: train
    rows and held-out rows are whole windows from disjoint parts, held-out ones from the file's last
    `eval_fraction`, and between them they reach both ends of each part."""
    n, seq_len = 4000, 32
    path = tmp_path / "positions.npy"
    np.save(path, np.arange(n, dtype=np.uint16))
    data = TokenData(str(path), seq_len=seq_len, seed=0, vocab_size=n, eval_fraction=eval_fraction)
    train = np.concatenate([data.train_batch(step, 8) for step in range(500)])
    held = np.concatenate([data.eval_batch(index, 8) for index in range(100)])
    boundary = int(n * (1 - eval_fraction))
    for rows in (train, held):
        assert rows.shape[1] == seq_len + 1 and (np.diff(rows, axis=1) == 1).all()    # contiguous windows
    assert np.intersect1d(train, held).size == 0
    assert train.max() < boundary <= held.min()
    assert train.min() <= 3 and train.max() >= boundary - 4 and held.min() <= boundary + 3 and held.max() >= n - 4


def test_windows_are_the_documented_draws():
    """Train rows of step s start at offsets drawn by PCG64 seeded with (seed, 0, s) from the train part,
    held-out batch i's with (seed, 1, i) from the last 5% (the TokenData docstring): the data order a
    resumed run relies on."""
    data = TokenData("builtin:python_docs", seq_len=32, seed=0, vocab_size=257)
    tokens = np.asarray(data.tokens)
    split = int(len(tokens) * 0.95)
    window = np.arange(33)
    for step in range(50):
        starts = np.random.default_rng([0, 0, step]).integers(0, split - 33, size=4, endpoint=True)
        np.testing.assert_array_equal(data.train_batch(step, 4), tokens[starts[:, None] + window])
    for index in range(5):
        starts = np.random.default_rng([0, 1, index]).integers(split, len(tokens) - 33, size=4, endpoint=True)
        np.testing.assert_array_equal(data.eval_batch(index, 4), tokens[starts[:, None] + window])


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
