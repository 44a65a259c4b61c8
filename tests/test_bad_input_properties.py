"""Property-based: every bad override or input file ends in a one-line UserError (exit code 2 from the
CLI, see test_cli.py) before any compute, and writes nothing."""
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hal import UserError
from launch.train import config_error
from tests.conftest import compose

POSITIVE_INTS = ["trainer.global_batch", "trainer.seq_len", "trainer.log_every", "trainer.eval_batches",
                 "trainer.keep_checkpoints", "model.hidden_size", "model.num_hidden_layers",
                 "model.num_attention_heads", "model.vocab_size", "model.intermediate_size"]
NON_NEGATIVE_INTS = ["trainer.steps", "trainer.eval_every", "trainer.checkpoint_every", "optim.warmup_steps", "seed"]
UNIT_FLOATS = ["optim.b1", "optim.b2", "optim.min_lr_ratio"]

bad_int = st.one_of(st.integers(max_value=-1), st.just("abc"), st.just(1.5), st.just(True))
case = st.one_of(
    st.tuples(st.sampled_from(POSITIVE_INTS), st.one_of(bad_int, st.just(0))),
    st.tuples(st.sampled_from(NON_NEGATIVE_INTS), bad_int),
    st.tuples(st.sampled_from(UNIT_FLOATS), st.one_of(st.floats(min_value=1.0001, max_value=1e9),
                                                      st.floats(max_value=-1e-9, min_value=-1e9), st.just("x"))),
    st.tuples(st.just("optim.lr"), st.one_of(st.floats(max_value=-1e-12, min_value=-1e6), st.just("fast"))),
    st.tuples(st.just("trainer.micro_batch"), st.sampled_from([3, 5, 7, 6, -2])),       # global_batch 16
    st.tuples(st.just("trainer.seq_len"), st.integers(min_value=1025, max_value=10**6)),  # > max positions
    st.tuples(st.just("optim.schedule"), st.sampled_from(["cosin", "step", ""])),
    st.tuples(st.just("trainer.precision"), st.sampled_from(["fp16", "int8", "bf32"])),
    st.tuples(st.just("trainer.on_nonfinite"), st.sampled_from(["ignore", "", "retry"])),
    st.tuples(st.just("model.num_key_value_heads"), st.sampled_from([3, 5, 8, 0])),       # must divide 4 heads
    st.tuples(st.just("hal.mesh"), st.sampled_from(["{data:2}", "{fsdp:3}", "{data:-1,fsdp:-1}", "{pipe:1}",
                                                    "{data:0}"])),
)


def _value(v):
    return json.dumps(v) if isinstance(v, str) and not v.startswith("{") else str(v).lower() \
        if isinstance(v, bool) else str(v)


def test_bad_overrides_are_one_line_errors(tmp_path_factory):
    """80 generated bad overrides of many keys, on either framework; the counts prove hypothesis ran them
    here (a check in another test would pass when that test ran alone)."""
    tried = []

    @settings(max_examples=80, deadline=None, derandomize=True)     # the same cases in every CI run
    @given(case=case, framework=st.sampled_from(["jax", "torch"]))
    def bad_override_is_one_line_error(case, framework):
        key, value = case
        run_dir = tmp_path_factory.mktemp("bad") / "run"
        tried.append((key, value, framework))
        overrides = [f"hal={framework}", f"{key}={_value(value)}"]
        message, _ = config_error(overrides)                 # the schema's and the ranges' checks, as the CLI
        if message is None:
            with pytest.raises(UserError) as e:
                from trainer.loop import train
                train(compose(overrides), run_dir)
            message = str(e.value)
        assert "\n" not in message and message
        assert not run_dir.exists()                          # nothing written

    bad_override_is_one_line_error()
    assert len(tried) >= 80
    assert {framework for _, _, framework in tried} == {"jax", "torch"} and len({k for k, _, _ in tried}) >= 10


def _token_file(path: Path, array) -> Path:
    np.save(path, array)
    return path


@pytest.mark.parametrize("make", [
    lambda p: (p.write_bytes(b""), p)[1],                                            # empty
    lambda p: (p.write_bytes(bytes(range(256)) * 8), p)[1],                          # binary, not .npy
    lambda p: _token_file(p, np.full(5000, 300, np.uint16)),                         # ids beyond the vocab
    lambda p: _token_file(p, np.zeros(10, np.uint16)),                               # too short
    lambda p: _token_file(p, np.zeros((100, 100), np.uint16)),                       # not 1-D
    lambda p: _token_file(p, np.zeros(5000, np.float32)),                            # not integers
    lambda p: p.parent,                                                              # a directory
])
def test_bad_token_files(tmp_path, make):
    path = make(tmp_path / "tokens.npy")
    before = path.read_bytes() if path.is_file() else None
    from trainer.loop import train
    with pytest.raises(UserError) as e:
        train(compose(["hal=jax", "data=tokens", f"data.path={path}"]), tmp_path / "run")
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "run").exists()
    if before is not None:
        assert path.read_bytes() == before
