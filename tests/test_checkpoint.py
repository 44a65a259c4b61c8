"""The checkpoint format: atomic, self-describing, verified on load, readable by either framework."""
import json
import os
import shutil

import numpy as np
import pytest

from hal import HostState, OptimizerSpec, UserError, make_backend
from models.spec import SIZES, reference_init
from trainer import checkpoint

META = {"model": {}, "writer": {}}


@pytest.fixture(scope="module", params=["torch", "jax"])
def backend(request):
    return make_backend({"framework": request.param}, SIZES["tiny"], OptimizerSpec())


def _save(root, step, backend, state=None, meta=META, config=""):
    backend.set_state(state or _state())
    return checkpoint.save(root, step, backend, meta, config)


def _state(seed=0, count=3):
    params = reference_init(SIZES["tiny"], seed)
    rng = np.random.default_rng(seed)
    mu = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    nu = {k: np.abs(rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    return HostState(params, mu, nu, count)


def test_round_trip_and_manifest(tmp_path, backend):
    st = _state()
    path = _save(tmp_path, 3, backend, st, {"model": SIZES["tiny"].to_dict(), "writer": {"framework": "x"}}, "a: 1\n")
    backend.set_state(_state(seed=1, count=9))
    manifest = checkpoint.load(path, backend)
    loaded = backend.get_state()
    assert loaded.count == 3
    for group in ("params", "mu", "nu"):
        a, b = getattr(st, group), getattr(loaded, group)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION and manifest["step"] == 3
    info = manifest["tensors"]["params/model.layers.0.self_attn.q_proj.weight"]
    assert info["shape"] == [128, 128] and info["dtype"] == "float32" and isinstance(info["digest"], int)
    assert manifest["tensors"]["opt/count"] == {"shape": [], "dtype": "int32", "digest": manifest["tensors"][
        "opt/count"]["digest"]}
    assert (path / "config.yaml").read_text() == "a: 1\n"
    assert checkpoint.resolve(tmp_path) == path and checkpoint.resolve(path) == path


def test_a_failed_save_leaves_nothing_a_resume_would_read(tmp_path, backend):
    good = _save(tmp_path, 1, backend)
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path, 2, backend, {"model": {}, "writer": {}, "bad": object()})  # fails after the tensors
    assert checkpoint.list_steps(tmp_path) == [1]
    assert sorted(os.listdir(tmp_path)) == ["1"]        # no temp dir left behind
    checkpoint.load(good, backend)
    assert backend.get_state().count == 3


def test_leftover_temp_dirs_are_ignored_and_pruned(tmp_path, backend):
    _save(tmp_path, 1, backend)
    (tmp_path / ".tmp-2-crashed").mkdir()
    (tmp_path / "7").mkdir()                            # a step-named dir without a manifest: incomplete
    assert checkpoint.list_steps(tmp_path) == [1]
    checkpoint.prune(tmp_path, keep=1)
    assert not (tmp_path / ".tmp-2-crashed").exists()


def test_keep_last_k(tmp_path, backend):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, backend)
        checkpoint.prune(tmp_path, keep=2)
    assert checkpoint.list_steps(tmp_path) == [3, 4]


def test_damaged_tensor_is_detected(tmp_path, backend):
    path = _save(tmp_path, 1, backend)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tensors"]["opt/mu/model.norm.weight"]["digest"] ^= 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="opt/mu/model.norm.weight"):
        checkpoint.load(path, backend)


def test_not_a_checkpoint(tmp_path, backend):
    with pytest.raises(UserError, match="not a trichip checkpoint"):
        checkpoint.resolve(tmp_path)
    shutil.copytree(_save(tmp_path / "a", 1, backend), tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 99"):
        checkpoint.load(tmp_path / "b", backend)
