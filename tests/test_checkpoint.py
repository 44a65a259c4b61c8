"""The checkpoint format: atomic, self-describing, verified on load, readable by either framework."""
import json
import os
import shutil

import numpy as np
import pytest

from hal import HostState, UserError
from models.spec import SIZES, reference_init
from trainer import checkpoint


def _state(seed=0, count=3):
    params = reference_init(SIZES["tiny"], seed)
    rng = np.random.default_rng(seed)
    mu = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    nu = {k: np.abs(rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    return HostState(params, mu, nu, count)


def test_round_trip_and_manifest(tmp_path):
    st = _state()
    path = checkpoint.save(tmp_path, 3, st, {"model": SIZES["tiny"].to_dict(), "writer": {"framework": "x"}}, "a: 1\n")
    loaded, manifest = checkpoint.load(path)
    assert loaded.count == 3
    for group in ("params", "mu", "nu"):
        a, b = getattr(st, group), getattr(loaded, group)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION and manifest["step"] == 3
    info = manifest["tensors"]["params/model.layers.0.self_attn.q_proj.weight"]
    assert info["shape"] == [128, 128] and info["dtype"] == "float32" and isinstance(info["crc32"], int)
    assert (path / "config.yaml").read_text() == "a: 1\n"
    assert checkpoint.resolve(tmp_path) == path and checkpoint.resolve(path) == path


def test_a_failed_save_leaves_nothing_a_resume_would_read(tmp_path):
    good = checkpoint.save(tmp_path, 1, _state(), {"model": {}, "writer": {}})
    bad = _state()
    bad.params["model.norm.weight"] = object()          # orbax cannot serialize this: the save fails half-way
    with pytest.raises(Exception):
        checkpoint.save(tmp_path, 2, bad, {"model": {}, "writer": {}})
    assert checkpoint.list_steps(tmp_path) == [1]
    assert sorted(os.listdir(tmp_path)) == ["1"]        # no temp dir left behind
    assert checkpoint.load(good)[0].count == 3


def test_leftover_temp_dirs_are_ignored_and_pruned(tmp_path):
    checkpoint.save(tmp_path, 1, _state(), {"model": {}, "writer": {}})
    (tmp_path / ".tmp-2-crashed").mkdir()
    (tmp_path / "7").mkdir()                            # a step-named dir without a manifest: incomplete
    assert checkpoint.list_steps(tmp_path) == [1]
    checkpoint.prune(tmp_path, keep=1)
    assert not (tmp_path / ".tmp-2-crashed").exists()


def test_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, _state(), {"model": {}, "writer": {}})
        checkpoint.prune(tmp_path, keep=2)
    assert checkpoint.list_steps(tmp_path) == [3, 4]


def test_damaged_tensor_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, 1, _state(), {"model": {}, "writer": {}})
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tensors"]["opt/mu/model.norm.weight"]["crc32"] ^= 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="opt/mu/model.norm.weight"):
        checkpoint.load(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a trichip checkpoint"):
        checkpoint.resolve(tmp_path)
    shutil.copytree(checkpoint.save(tmp_path / "a", 1, _state(), {"model": {}, "writer": {}}), tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 99"):
        checkpoint.load(tmp_path / "b")
