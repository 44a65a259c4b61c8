"""The checkpoint format: atomic, self-describing, verified on load, readable by either framework."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hal import HostState, OptimizerSpec, UserError, make_backend
from models.spec import SIZES, reference_init
from trainer import checkpoint

ROOT = Path(__file__).resolve().parents[1]

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
    count = manifest["tensors"]["opt/count"]
    assert {k: count[k] for k in ("shape", "dtype")} == {"shape": [], "dtype": "int32"}
    # every digest is the definition's number for the array that was saved (not merely self-consistent)
    from hal import store
    saved = st.tensors()
    assert set(manifest["tensors"]) == set(saved)
    assert {k: v["digest"] for k, v in manifest["tensors"].items()} == \
        {k: store.digest_reference(v) for k, v in saved.items()}
    assert count["digest"] == store.digest_reference(np.asarray(3, np.int32)) != store.digest_reference(
        np.asarray(9, np.int32))
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


def test_checkpoints_in_the_earlier_ocdbt_layout_still_load(tmp_path, backend):
    """A single process writes each tensor as its own zarr array (faster to write); several processes write
    orbax's OCDBT layout, and checkpoints already on disk may hold it. orbax tells the two apart when
    reading, so both load."""
    import orbax.checkpoint as ocp

    from hal import store
    st = _state(seed=2, count=5)
    path = _save(tmp_path, 5, backend, st)
    state_dir = path / "state"
    assert not (state_dir / "manifest.ocdbt").exists()
    assert (state_dir / "params.model.norm.weight").is_dir()
    manifest = json.loads((path / "manifest.json").read_text())
    tensors = store.read_tensors(str(state_dir), list(manifest["tensors"]))
    shutil.rmtree(state_dir)
    with ocp.PyTreeCheckpointer(use_compression=False) as ckptr:    # the same tensors, OCDBT layout
        ckptr.save(str(state_dir), store._nested(tensors))
    assert (state_dir / "manifest.ocdbt").exists()
    backend.set_state(_state(seed=3, count=1))
    checkpoint.load(path, backend)          # verifies every digest
    loaded = backend.get_state()
    assert loaded.count == 5 and all(np.array_equal(st.nu[k], loaded.nu[k]) for k in st.nu)


def test_not_a_checkpoint(tmp_path, backend):
    with pytest.raises(UserError, match="not a trichip checkpoint"):
        checkpoint.resolve(tmp_path)
    shutil.copytree(_save(tmp_path / "a", 1, backend), tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 99"):
        checkpoint.load(tmp_path / "b", backend)


def test_digest_is_the_reference_value_under_any_sharding():
    """hal.store.digest (one jitted pass) gives digest_reference's number (plain NumPy, the definition),
    for every dtype a state holds (and more), and the digests of a tensor's shards add up to the whole
    tensor's however it is cut (rows, columns, strided) and however 8 host devices hold it."""
    from hal import store
    rng = np.random.default_rng(3)
    cases = [rng.standard_normal((33, 17)).astype(np.float32), np.asarray(7, np.int32),
             rng.integers(0, 2**16, (5, 3, 4)).astype(np.uint16), rng.standard_normal(1000).astype(np.float32),
             np.array([True, False, True]), rng.integers(0, 256, (3, 16)).astype(np.uint8),
             rng.standard_normal((4, 6)), np.asarray(2.5), rng.standard_normal((7, 3, 12)).astype(np.float16),
             rng.standard_normal((8, 24)).astype(np.float32)]
    for a in cases:       # odd and even last axes: one element per 64-bit word, or 2, 4, 8 packed in one
        assert store.digest(a) == store.digest_reference(a), a.dtype
    for a in (cases[0], cases[-1]):
        whole = store.digest(a)
        flipped = a.copy()
        flipped[3, 4] = np.nextafter(flipped[3, 4], np.float32(np.inf))
        assert store.digest(flipped) != whole
        swapped = a.copy()
        swapped[[0, 1]] = swapped[[1, 0]]
        assert store.digest(swapped) != whole                   # position-aware: a moved row is a change
        neighbours = a.copy()
        neighbours[2, [4, 5]] = neighbours[2, [5, 4]]
        assert store.digest(neighbours) != whole                # and so is a swap inside a packed word
        rows, cols = a.shape
        cuts = ([slice(0, 5), slice(5, rows)], [slice(0, rows, 2), slice(1, rows, 2)],
                [(slice(None), slice(k, cols, 3)) for k in range(3)],
                [(slice(None), slice(0, 4))] + [(slice(None), slice(4, cols, 2))] + [(slice(None), slice(5, cols, 2))])
        for cut in cuts:
            assert sum(store.digest(a[s], s if isinstance(s, tuple) else (s,), a.shape) for s in cut) % 2**64 == whole
    # rows of whole rows take the flattened layout, anything else the per-axis one
    a = cases[0]
    assert store._consecutive_base((slice(10, 33),), a.shape, (23, 17)) == 170
    assert store._consecutive_base((), a.shape, a.shape) == 0 and store._consecutive_base((), (), ()) == 0
    assert store._consecutive_base((slice(0, 33, 2),), a.shape, (17, 17)) is None
    assert store._consecutive_base((slice(7, 33, 9),), a.shape, (1, 17)) == 7 * 17
    assert store._consecutive_base((slice(None), slice(0, 17, 3)), a.shape, (33, 6)) is None
    assert store._consecutive_base((slice(0, 10), slice(0, 8)), a.shape, (10, 8)) is None
    code = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hal import store
assert len(jax.devices()) == 8
b = np.random.default_rng(4).standard_normal((64, 24)).astype(np.float32)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
for spec in (P("x", "y"), P("y"), P(None, "x"), P()):
    assert store.digests({"b": jax.device_put(b, NamedSharding(mesh, spec))})["b"] == store.digest_reference(b), spec
print("same")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"))
    assert r.returncode == 0 and r.stdout.strip() == "same", r.stderr[-3000:]


def test_async_snapshot_is_the_state_when_taken(tmp_path, backend):
    """backend.snapshot() copies the state: training on (JAX donates the state's buffers to the next step,
    torch updates its tensors in place) does not change what the write then stores — here the write runs
    only after two more steps. Then the same through PendingSave's background thread."""
    from trainer.data import TokenData
    data = TokenData("builtin:python_docs", 32, 0)
    batch = lambda step: data.train_batch(step, 4).reshape(1, 4, 33)  # noqa: E731
    backend.set_state(_state(seed=4, count=2))
    backend.train_step(batch(0), 1e-3)                # compiled (JAX) before the snapshot
    before = backend.get_state()
    write = backend.snapshot(copy=True)
    for step in range(1, 3):
        backend.train_step(batch(step), 1e-3)
    assert not np.array_equal(backend.get_state().params["model.norm.weight"], before.params["model.norm.weight"])
    written = write(str(tmp_path / "direct"))
    assert backend.combine(written) and set(written) == set(before.tensors())
    back = HostState.from_tensors(store_read(tmp_path / "direct", list(written)))
    for group in ("params", "mu", "nu"):
        a, b = getattr(before, group), getattr(back, group)
        assert all(np.array_equal(a[k], b[k]) for k in a), group
    assert back.count == before.count == 3

    backend.set_state(before)
    pending = checkpoint.PendingSave(tmp_path / "bg", 3, backend, META, "", background=True)
    for step in range(3, 5):
        backend.train_step(batch(step), 1e-3)
    path = pending.finish()
    assert path == tmp_path / "bg" / "3" and not (tmp_path / "bg" / ".tmp-3").exists()
    checkpoint.load(path, backend)                    # digests verified on load
    loaded = backend.get_state()
    for group in ("params", "mu", "nu"):
        a, b = getattr(before, group), getattr(loaded, group)
        assert all(np.array_equal(a[k], b[k]) for k in a), group


def store_read(path, names):
    from hal import store
    return store.read_tensors(str(path), names)


@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_async_and_sync_saves_write_the_same_checkpoints(tmp_path, fw):
    """A run with trainer.async_save=true commits the same checkpoints (steps, digests, values) as one
    that blocks on every save, and trains the same losses."""
    from conftest import metrics, train
    common = (f"hal={fw}", "trainer.steps=7", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=10",
              "trainer.seq_len=32", "trainer.global_batch=4", "trainer.eval_every=0")
    train(tmp_path / "async", *common, "trainer.async_save=true")
    train(tmp_path / "sync", *common, "trainer.async_save=false")
    steps = lambda run: sorted(int(p.name) for p in (run / "checkpoints").iterdir())  # noqa: E731
    assert steps(tmp_path / "async") == steps(tmp_path / "sync") == [2, 4, 6, 7]
    for s in (2, 4, 6, 7):
        a, b = (checkpoint.read_manifest(tmp_path / run / "checkpoints" / str(s)) for run in ("async", "sync"))
        assert {k: v["digest"] for k, v in a["tensors"].items()} == {k: v["digest"] for k, v in b["tensors"].items()}
        assert a["data"]["next_step"] == s
    assert [m["loss"] for m in metrics(tmp_path / "async")] == [m["loss"] for m in metrics(tmp_path / "sync")]


def test_gc_is_paused_while_orbax_writes_and_restored_after(tmp_path):
    """hal.store.gc_paused: off while any writer or reader runs (threads overlap), back as it was after."""
    import gc
    import threading

    from hal import store
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other():
        with store.gc_paused():
            inside.set()
            release.wait(10)
    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    seen = []
    with store.gc_paused():
        seen.append(gc.isenabled())
    seen.append(gc.isenabled())            # the other thread still holds it
    release.set()
    t.join()
    assert seen == [False, False] and gc.isenabled()
    store.write_tensors(str(tmp_path / "a"), {"x": np.arange(6, dtype=np.float32)})
    assert gc.isenabled()
    gc.disable()
    try:
        store.write_tensors(str(tmp_path / "b"), {"x": np.arange(6, dtype=np.float32)})
        assert not gc.isenabled()          # was off: stays off
    finally:
        gc.enable()
    assert np.array_equal(store.read_tensors(str(tmp_path / "b"), ["x"])["x"], np.arange(6, dtype=np.float32))
