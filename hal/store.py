"""Tensor storage for checkpoints: orbax-checkpoint (OCDBT over tensorstore).

Tensors are one nested tree keyed by storage names ("params/model.layers.0.mlp.up_proj.weight",
"opt/mu/...", "opt/count"); any backend reads them without knowing who wrote them.

Sharded jax.Arrays are written by the processes that hold them (nothing is gathered) and restored
straight into a target sharding (resharding on load). Each tensor gets a 64-bit digest that is a sum
over elements of a hash of (global position, bits): every process digests the shards it owns, the
sums add up, and the result is the same for any sharding — so a checkpoint written on 8 devices is
verified on 2 processes.
"""
from __future__ import annotations

import math
import os

import numpy as np

from models.spec import flatten, nest

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def digest(values: np.ndarray, index: tuple = (), shape: tuple | None = None) -> int:
    """Digest of a shard `values` = global_array[index] of a tensor of `shape` (whole array by default)."""
    values = np.ascontiguousarray(values)
    shape = values.shape if shape is None else tuple(shape)
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    pos = np.zeros((1,) * len(shape), np.uint64)
    for d, (sl, n) in enumerate(zip(index, shape)):
        start, stop, step = sl.indices(n)
        stride = np.uint64(math.prod(shape[d + 1:]))
        axis = np.arange(start, stop, step, dtype=np.uint64) * stride
        pos = pos + axis.reshape([-1 if i == d else 1 for i in range(len(shape))])
    bits = values.view(f"u{values.itemsize}").astype(np.uint64)
    x = np.asarray(bits ^ (pos * _GOLDEN), np.uint64).reshape(-1)
    x ^= x >> np.uint64(31)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return int(x.sum(dtype=np.uint64))


def _owned_digest(array) -> int:
    """This process's share of a tensor's digest (numpy: the whole array; jax: owned shards)."""
    if isinstance(array, np.ndarray) or np.isscalar(array):
        return digest(np.asarray(array))
    total = 0
    for shard in array.addressable_shards:
        if shard.replica_id == 0:
            total += digest(np.asarray(shard.data), shard.index, array.shape)
    return total % 2**64


def digests(tensors: dict, allreduce=None) -> dict[str, int]:
    """{name: digest}. With several processes, `allreduce(np.uint64 array) -> summed array` adds the parts."""
    names = list(tensors)
    parts = np.array([_owned_digest(tensors[n]) for n in names], np.uint64)
    if allreduce is not None:
        parts = allreduce(parts)
    return {n: int(v) for n, v in zip(names, parts)}


def _nested(tensors: dict) -> dict:
    return nest({name.replace("/", "."): value for name, value in tensors.items()})


def _use_distributed_barriers() -> None:
    """orbax's default barriers are device collectives (jax sync_global_devices). Its background threads
    and the main thread can then issue collectives in different orders on different processes, and a
    CPU (gloo) run deadlocks. Barriers through the jax.distributed key-value store cannot interleave."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


def write_tensors(path: str, tensors: dict) -> None:
    """Write {storage name: numpy or jax array} under `path` (which must not exist). Collective: every
    process calls it with its (sharded) arrays; each writes what it owns."""
    import orbax.checkpoint as ocp
    _use_distributed_barriers()
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), _nested(tensors))


def read_tensors(path: str, names: list[str], shardings: dict | None = None) -> dict:
    """Read the named tensors: as host NumPy arrays, or as jax.Arrays placed with `shardings[name]`
    (only the shards this process holds are read)."""
    import orbax.checkpoint as ocp

    def args(name):
        if shardings is None:
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.ArrayRestoreArgs(sharding=shardings[name])
    restore_args = _nested({n: args(n) for n in names})
    _use_distributed_barriers()
    with ocp.PyTreeCheckpointer() as ckptr:   # partial_restore: read only the named tensors
        tree = ckptr.restore(os.path.abspath(path), args=ocp.args.PyTreeRestore(
            item=_nested({n: 0 for n in names}), restore_args=restore_args, partial_restore=True))
    flat = flatten(tree)
    return {n: flat[n.replace("/", ".")] for n in names}
