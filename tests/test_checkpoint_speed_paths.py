"""The fast paths of checkpoint I/O: pooled host buffers of background saves, the direct read of a
single-process checkpoint with its digests, and state placement that shares what was read."""
import os
import threading

import numpy as np
import pytest

from hal import HostState, OptimizerSpec, make_backend, store
from hal.base import CheckpointDamaged
from hal.host_buffers import HostBufferPool
from models.spec import SIZES
from tests.test_checkpoint import _state
from trainer import checkpoint

META = {"model": {}, "writer": {}}


def _equal(a: HostState, b: HostState) -> bool:
    return a.count == b.count and all(
        getattr(a, g).keys() == getattr(b, g).keys()
        and all(np.array_equal(getattr(a, g)[k], getattr(b, g)[k]) for k in getattr(a, g))
        for g in ("params", "mu", "nu"))


# -- the buffer pool ----------------------------------------------------------------------------------------
def _torch_pool():
    import torch
    return HostBufferPool(lambda shape, dtype: torch.empty(shape, dtype=dtype))


def test_pool_hands_the_same_buffers_to_the_next_save():
    import torch
    pool = _torch_pool()
    layout = {"a": ((3, 4), torch.float32), "b": ((5,), torch.float32)}
    first = pool.acquire(layout)
    first["a"].copy_(torch.arange(12.0).reshape(3, 4))
    pool.release(first)
    second = pool.acquire(layout)
    assert pool.allocations == 2
    assert all(second[n].data_ptr() == first[n].data_ptr() for n in layout)
    assert torch.equal(second["a"], torch.arange(12.0).reshape(3, 4))      # the same memory, not a new one


def test_pool_makes_a_second_set_only_while_the_first_is_held():
    import torch
    pool = _torch_pool()
    layout = {"a": ((2, 2), torch.float32)}
    held = pool.acquire(layout)
    other = pool.acquire(layout)                  # a save still in flight: a set of its own
    assert pool.allocations == 2 and other["a"].data_ptr() != held["a"].data_ptr()
    pool.release(held)
    pool.release(other)
    assert pool.sets() == 2
    again = [pool.acquire(layout), pool.acquire(layout)]
    assert pool.allocations == 2 and {s["a"].data_ptr() for s in again} == {held["a"].data_ptr(), other["a"].data_ptr()}


def test_pool_remakes_a_buffer_whose_shape_or_dtype_changed():
    import torch
    pool = _torch_pool()
    s = pool.acquire({"a": ((2,), torch.float32), "b": ((3,), torch.float32)})
    pool.release(s)
    t = pool.acquire({"a": ((4,), torch.float32), "b": ((3,), torch.bfloat16)})
    assert t["a"].shape == (4,) and t["b"].dtype == torch.bfloat16 and pool.allocations == 4


def test_pool_is_safe_across_threads():
    import torch
    pool = _torch_pool()
    layout = {"a": ((8,), torch.float32)}
    seen = []

    def save():
        for _ in range(20):
            s = pool.acquire(layout)
            seen.append(s["a"].data_ptr())
            pool.release(s)
    threads = [threading.Thread(target=save) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == pool.allocations <= 3


# -- torch snapshots through the pool (the CPU path of the GPU's pinned buffers) ----------------------------
@pytest.fixture(scope="module")
def torch_backend():
    return make_backend({"framework": "torch"}, SIZES["tiny"], OptimizerSpec())


def test_background_saves_reuse_the_host_buffers_and_write_the_state_of_the_call(tmp_path, torch_backend):
    b = torch_backend
    st = _state()
    b.set_state(st)
    tokens = np.random.default_rng(0).integers(0, SIZES["tiny"].vocab_size, (1, 2, 17), dtype=np.int32)
    pending = checkpoint.PendingSave(tmp_path, 1, b, META, background=True)
    pending.finish()
    made = b._buffer_pool.allocations
    assert made == len(st.tensors()) - 1          # every tensor but opt/count, once

    snap = b.snapshot(copy=True)                   # what a background save takes; the write runs later
    b.train_step(tokens, 1e-3)                      # the state moves on before the write
    after_step = b.get_state()
    written = snap(str(tmp_path / "late"))
    assert b._buffer_pool.allocations == made and b._buffer_pool.sets() == 1    # the same buffers again
    read = store.read_tensors(str(tmp_path / "late"), list(written))
    for k, v in st.tensors().items():
        assert np.array_equal(read[k], v), k       # the state as of the snapshot call, not after the step
        assert written[k]["part"] == store.digest_reference(v)
    assert not _equal(after_step, st)

    b.set_state(_state(seed=1, count=7))
    checkpoint.load(tmp_path / "1", b)
    assert _equal(b.get_state(), st)


def test_set_state_keeps_no_reference_to_the_callers_arrays(torch_backend):
    b = torch_backend
    st = _state(seed=2)
    kept = {k: v.copy() for k, v in st.tensors().items()}
    b.set_state(st)
    tokens = np.random.default_rng(1).integers(0, SIZES["tiny"].vocab_size, (1, 2, 17), dtype=np.int32)
    b.train_step(tokens, 1e-2)
    assert all(np.array_equal(v, kept[k]) for k, v in st.tensors().items())   # the optimizer wrote its own copies


def test_a_loaded_state_trains_on_from_what_was_read(tmp_path, torch_backend):
    """The moments a load places share the arrays it read; a step after it equals a step after set_state."""
    b = torch_backend
    st = _state(seed=3)
    b.set_state(st)
    path = checkpoint.save(tmp_path, 3, b, META)
    tokens = np.random.default_rng(2).integers(0, SIZES["tiny"].vocab_size, (1, 2, 17), dtype=np.int32)
    b.train_step(tokens, 1e-2)
    expected = b.get_state()
    b.set_state(_state(seed=4))
    checkpoint.load(path, b)
    b.train_step(tokens, 1e-2)
    assert _equal(b.get_state(), expected)


# -- the direct read of a single-process checkpoint ---------------------------------------------------------
def _tensors():
    rng = np.random.default_rng(5)
    return {"params/w": rng.standard_normal((6, 8)).astype(np.float32),
            "opt/mu/w": rng.standard_normal((6, 8)).astype(np.float32),
            "opt/count": np.asarray(4, np.int32)}


def test_direct_read_matches_orbax_and_the_digest_definition(tmp_path):
    t = _tensors()
    store.write_tensors(str(tmp_path / "s"), t)
    assert store._plain_zarr(str(tmp_path / "s"))
    read, found = store.read_and_summarize(str(tmp_path / "s"), list(t))
    via_orbax = store.read_tensors(str(tmp_path / "s"), list(t))
    for k, v in t.items():
        assert np.array_equal(read[k], v) and np.array_equal(via_orbax[k], v) and read[k].dtype == v.dtype
        assert read[k].ctypes.data % 64 == 0
        assert found[k] == {"shape": list(v.shape), "dtype": str(v.dtype), "digest": store.digest_reference(v)}


def test_direct_read_places_arrays_with_shardings(tmp_path):
    import jax
    from jax.sharding import SingleDeviceSharding
    t = _tensors()
    store.write_tensors(str(tmp_path / "s"), t)
    sh = {k: SingleDeviceSharding(jax.devices()[0]) for k in t}
    read, found = store.read_and_summarize(str(tmp_path / "s"), list(t), shardings=sh)
    assert all(isinstance(v, jax.Array) and np.array_equal(np.asarray(v), t[k]) for k, v in read.items())
    assert found["params/w"]["digest"] == store.digest_reference(t["params/w"])


def test_direct_read_calls_a_missing_chunk_or_tensor_damage(tmp_path):
    t = _tensors()
    store.write_tensors(str(tmp_path / "s"), t)
    with pytest.raises(CheckpointDamaged, match="tensor opt/nu/w is missing"):
        store.read_and_summarize(str(tmp_path / "s"), list(t) + ["opt/nu/w"])
    chunk = tmp_path / "s" / "params.w" / "0.0"
    assert chunk.exists()
    os.unlink(chunk)
    with pytest.raises(CheckpointDamaged, match="params/w"):
        store.read_and_summarize(str(tmp_path / "s"), list(t))


def test_direct_read_digest_sees_a_flipped_byte(tmp_path):
    t = _tensors()
    store.write_tensors(str(tmp_path / "s"), t)
    chunk = tmp_path / "s" / "params.w" / "0.0"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0x10
    chunk.write_bytes(bytes(data))
    _, found = store.read_and_summarize(str(tmp_path / "s"), list(t))
    assert found["params/w"]["digest"] != store.digest_reference(t["params/w"])
    assert found["opt/mu/w"]["digest"] == store.digest_reference(t["opt/mu/w"])


def test_an_ocdbt_checkpoint_is_read_through_orbax(tmp_path):
    import orbax.checkpoint as ocp
    t = _tensors()
    with ocp.PyTreeCheckpointer(use_ocdbt=True) as ckptr:
        ckptr.save(str(tmp_path / "s"), store._nested(t))
    assert not store._plain_zarr(str(tmp_path / "s"))
    read, found = store.read_and_summarize(str(tmp_path / "s"), list(t))
    assert all(np.array_equal(read[k], v) for k, v in t.items())
    assert {k: f["digest"] for k, f in found.items()} == {k: store.digest_reference(v) for k, v in t.items()}


# -- device-to-host transfers of a save, a window at a time ------------------------------------------------
def test_windows_keep_order_and_bound_the_bytes_in_flight():
    arrays = [np.zeros(n, np.uint8) for n in (10, 300, 5, 5, 2000, 1)]
    groups = store._windows(arrays, 300)
    assert [[a.nbytes for a in g] for g in groups] == [[10], [300], [5, 5], [2000], [1]]
    assert [id(a) for g in groups for a in g] == [id(a) for a in arrays]


def test_on_host_hands_back_every_array_as_its_host_copy(monkeypatch):
    import jax
    monkeypatch.setattr(store, "_TRANSFER_WINDOW", 64)          # several windows for a few small arrays
    rng = np.random.default_rng(6)
    values = {f"t{i}": rng.standard_normal((i + 1, 5)).astype(np.float32) for i in range(6)}
    tensors = {k: jax.device_put(v) for k, v in values.items()}
    tensors["host"] = np.arange(3)
    host = store._on_host(tensors)
    assert list(host) == list(tensors)
    assert all(isinstance(v, np.ndarray) and np.array_equal(v, values[k]) for k, v in host.items() if k != "host")
    assert host["host"] is tensors["host"]
