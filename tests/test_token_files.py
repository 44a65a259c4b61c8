"""Token files whose contents or sidecar disagree with what training needs: one-line UserErrors, before any compute."""
import json

import numpy as np
import pytest

from hal import UserError
from trainer.data import TokenData, write_token_file


@pytest.fixture
def token_file(tmp_path):
    return write_token_file(tmp_path / "t.npy", ["hello world " * 200])


def _sidecar(path, **changes):
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("change,needle", [
    ({"num_tokens": 5}, "says 5"),
    ({"vocab_size": 100}, "vocab_size 100"),
])
def test_a_sidecar_that_disagrees_with_its_tokens(token_file, change, needle):
    TokenData(str(token_file), 32, 0, 257)              # as written: fine
    _sidecar(token_file, **change)
    with pytest.raises(UserError, match=needle) as e:
        TokenData(str(token_file), 32, 0, 257)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("contents,needle", [
    (np.arange(-5, 3000, dtype=np.int32), "negative token ids"),
    (np.linspace(0, 1, 3000), "1-D integer array"),
    (np.arange(3000, dtype=np.int32).reshape(30, 100), "1-D integer array"),
    (np.arange(3000, dtype=np.int32), "vocab_size is 257"),
])
def test_unexpected_token_file_contents(tmp_path, contents, needle):
    path = tmp_path / "bad.npy"
    np.save(path, contents)
    with pytest.raises(UserError, match=needle) as e:
        TokenData(str(path), 32, 0, 257)
    assert "\n" not in str(e.value)


def test_a_sidecar_that_is_not_json(token_file):
    token_file.with_suffix(".json").write_text("{not json")
    with pytest.raises(UserError, match="is not JSON"):
        TokenData(str(token_file), 32, 0, 257)
