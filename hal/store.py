"""Tensor storage for checkpoints: orbax-checkpoint over tensorstore (zarr arrays; OCDBT with several processes).

Tensors are one nested tree keyed by storage names ("params/model.layers.0.mlp.up_proj.weight",
"opt/mu/...", "opt/count"); any backend reads them without knowing who wrote them.

Sharded jax.Arrays are written by the processes that hold them (nothing is gathered) and restored
straight into a target sharding (resharding on load). Each tensor gets a 64-bit digest that is a sum
over elements of a hash of (global position, bits): every process digests the shards it owns, the
sums add up, and the result is the same for any sharding — so a checkpoint written on 8 devices is
verified on 2 processes.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import sys
import threading

import numpy as np

from models.spec import flatten, nest

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def digest_reference(values: np.ndarray, index: tuple = (), shape: tuple | None = None) -> int:
    """The digest in plain NumPy (the definition; `digest` computes the same number faster)."""
    values = np.ascontiguousarray(values)
    shape = values.shape if shape is None else tuple(shape)
    starts, steps, strides = _layout(index, shape)
    pos = np.zeros((1,) * len(values.shape), np.uint64)
    for d, n in enumerate(values.shape):
        axis = (np.uint64(starts[d]) + np.arange(n, dtype=np.uint64) * np.uint64(steps[d])) * np.uint64(strides[d])
        pos = pos + axis.reshape([-1 if i == d else 1 for i in range(len(values.shape))])
    bits = values.view(f"u{values.itemsize}").astype(np.uint64)
    x = np.asarray(bits ^ (pos * _GOLDEN), np.uint64).reshape(-1)
    x ^= x >> np.uint64(31)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return int(x.sum(dtype=np.uint64))


def _layout(index: tuple, shape: tuple):
    """Per dimension: the shard's first global index, its step, and the global row-major stride."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    starts, steps = [], []
    for sl, n in zip(index, shape):
        start, _, step = sl.indices(n)
        starts.append(start)
        steps.append(step)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    return starts, steps, strides


def _words(values, group: bool):
    """(words, k): `values` as uint64 words. Where the last axis holds a multiple of k = 8 // itemsize elements,
    each word packs k neighbours along it (element j in bits [j*8*itemsize, ...): `group` only on a little-endian
    host CPU): a bitcast, no conversion. Otherwise one element per word (k = 1), zero-extended (GPUs, odd axes).
    XLA:CPU compiles the 32->64-bit conversion fused into the sum poorly: the whole digest of 37.7M float32
    took 0.10 s that way and 0.055 s with packed words (one core, the same values)."""
    import jax
    import jax.numpy as jnp
    size = values.dtype.itemsize
    k = 8 // size
    if group and size < 8 and values.ndim and values.shape[-1] % k == 0:
        packed = values.reshape(values.shape[:-1] + (values.shape[-1] // k, k))
        return jax.lax.bitcast_convert_type(packed, jnp.uint64), k
    u = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[size]
    return jax.lax.bitcast_convert_type(values, u).astype(jnp.uint64), 1


def _digest_kernel_fn(values, starts, steps, strides, flat: bool, group: bool):
    """Sum over elements of mix(bits ^ position * GOLDEN), one fused pass. With `flat` the shard's elements are
    consecutive in the tensor's row-major order (a whole tensor, or rows of it) and starts/steps/strides
    describe the flattened shard. Positions are computed per word; limb j of a word sits j steps further
    along the last axis."""
    import jax
    import jax.numpy as jnp
    if flat:
        values = values.reshape(-1)
    words, k = _words(values, group)
    scale = steps * strides * jnp.uint64(_GOLDEN)    # position * GOLDEN, distributed: one multiply per axis
    pos = jnp.sum(starts * strides, dtype=jnp.uint64) * jnp.uint64(_GOLDEN)
    for d in range(words.ndim):
        axis = jax.lax.broadcasted_iota(np.uint64, words.shape, d)
        pos = pos + axis * (scale[d] * np.uint64(k) if d == words.ndim - 1 else scale[d])
    limb = scale[-1]
    bits = 64 // k
    total = 0
    for j in range(k):
        part = words >> np.uint64(bits * j) if j else words
        if j < k - 1:
            part = part & np.uint64((1 << bits) - 1)
        total = total + _mix(part ^ (pos + limb * np.uint64(j) if j else pos))
    return jnp.sum(total, dtype=jnp.uint64)


def _mix(x):
    import jax.numpy as jnp
    x = x ^ (x >> 31)
    x = x * jnp.uint64(_MIX1)
    x = x ^ (x >> 27)
    x = x * jnp.uint64(_MIX2)
    return x ^ (x >> 31)


@functools.cache
def _digest_kernel(platform: str):
    """The jitted digest pass (~6x faster than NumPy's ten passes over uint64 temporaries). On the CPU it is
    compiled for 512-bit vectors, which XLA does not prefer by default: ~20% faster there (the 64-bit
    multiplies), and a compile option of this kernel alone, not of the model's."""
    import jax
    jit = functools.partial(jax.jit, _digest_kernel_fn, static_argnames=("flat", "group"))
    if platform != "cpu":
        return jit()
    try:
        kernel = jit(compiler_options={"xla_cpu_prefer_vector_width": 512})
        with jax.enable_x64(True):
            one = np.ones(1, np.uint64)
            kernel(jax.device_put(np.zeros(8, np.float32), _host_device()), one * 0, one, one,
                   flat=True, group=True).block_until_ready()
        return kernel
    except Exception:        # a JAX or XLA without the option (only speed depends on it)
        return jit()


def _consecutive_base(index: tuple, shape: tuple, local_shape: tuple):
    """The global row-major position of the shard's first element when its elements are consecutive
    there (all dims but the first whole, the first a step-1 range), else None."""
    starts, steps, strides = _layout(index, shape)
    if len(shape) == 0:
        return 0
    if steps[0] != 1 and local_shape[0] > 1:
        return None
    if any(starts[d] != 0 or local_shape[d] != shape[d] for d in range(1, len(shape))):
        return None
    return starts[0] * strides[0]


_DIGEST_ON_DEVICE = ("cpu", "gpu", "cuda", "rocm")


def _host_device():
    import jax
    try:
        return jax.local_devices(backend="cpu")[0]     # this process's (jax.devices() lists every process's)
    except RuntimeError:         # JAX pinned to an accelerator platform only: digest there
        return jax.local_devices()[0]


def digest(values, index: tuple = (), shape: tuple | None = None) -> int:
    return int(_digest_future(values, index, shape))


def _digest_future(values, index: tuple = (), shape: tuple | None = None):
    """Digest of a shard `values` = global_array[index] of a tensor of `shape` (whole array by default).

    `values` is a NumPy array (digested on the host CPU) or a single-device jax.Array (digested where it
    lives). The value is digest_reference's: a sum over elements of a 64-bit mix of (global position, bits)."""
    import jax
    shape = tuple(values.shape) if shape is None else tuple(shape)
    if isinstance(values, jax.Array) and next(iter(values.devices())).platform not in _DIGEST_ON_DEVICE:
        values = np.asarray(values)      # TPU, Neuron: 64-bit integers are emulated or narrowed there
    with jax.enable_x64(True):     # thread-local: the model's own dtypes are untouched; float64 stays 64-bit
        if isinstance(values, np.ndarray) or np.isscalar(values):
            values = np.asarray(values)
            if values.dtype == np.bool_:
                values = values.view(np.uint8)
            values = jax.device_put(values, _host_device())     # zero-copy for 64-byte aligned arrays (torch's)
        platform = next(iter(values.devices())).platform
        base = _consecutive_base(index, shape, tuple(values.shape))
        layout = [[base], [1], [1]] if base is not None else _layout(index, shape)
        args = [np.asarray(v, np.uint64).reshape(-1) for v in layout]
        return _digest_kernel(platform)(values, *args, flat=base is not None,
                                        group=platform == "cpu" and sys.byteorder == "little")  # dispatched


def _owned_shards(array) -> list:
    """[(values, index, global shape)] this process digests for a tensor: a NumPy array whole; a
    jax.Array's addressable shards of replica 0 (each a single-device array)."""
    if isinstance(array, np.ndarray) or np.isscalar(array):
        array = np.asarray(array)
        return [(array, (), array.shape)]
    return [(shard.data, shard.index, array.shape) for shard in array.addressable_shards if shard.replica_id == 0]


def _shard_jobs(tensors: dict, process_index: int) -> list:
    """Per tensor, the shards whose digests this process adds, with no collective: a jax.Array's shards
    of replica 0 that this process holds; a NumPy array (a whole replica every process holds) on process 0
    only. Summed over processes (mod 2**64), the parts are the digests."""
    return [[] if isinstance(v, np.ndarray) and process_index != 0 else _owned_shards(v) for v in tensors.values()]


def _sum_parts(jobs: list) -> np.ndarray:
    pending = [[_digest_future(*job) for job in shards] for shards in jobs]   # all dispatched, then waited for
    return np.array([sum(int(p) for p in ps) % 2**64 for ps in pending], np.uint64)


def write_and_describe(path: str, tensors: dict, process_index: int = 0) -> dict:
    """write_tensors, and {name: {shape, dtype, part}} with `part` this process's share of the tensor's
    digest (see _shard_jobs), computed beside the write (both release the GIL). The
    shards are taken here first: a jax.Array's shard list is built lazily, and building it from two
    threads at once handed orbax a wrong object."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = _shard_jobs(tensors, process_index)
    with ThreadPoolExecutor(1, thread_name_prefix="digests") as pool:
        parts = pool.submit(_sum_parts, jobs)
        write_tensors(path, tensors)
        return _described(tensors, parts.result())


def _described(tensors: dict, parts: np.ndarray) -> dict:
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype if isinstance(v, (np.ndarray, np.generic))
                                                       else v.dtype), "part": int(p)}
            for (k, v), p in zip(tensors.items(), parts)}


def digests(tensors: dict, allreduce=None) -> dict[str, int]:
    """{name: digest}. With several processes, `allreduce(np.uint64 array) -> summed array` adds the parts."""
    names = list(tensors)
    parts = _sum_parts([_owned_shards(tensors[n]) for n in names])
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


_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused():
    """No automatic garbage collection while orbax runs: it allocates enough small objects to set off
    full collections, each a walk over every object torch and JAX keep alive (0.05 s of a 0.4 s save of
    the small model, measured alternately). Reference counting still frees what it can; collection
    resumes when the last of any overlapping writers and readers (threads) ends, if it was on before."""
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                gc.enable()


def write_tensors(path: str, tensors: dict) -> None:
    """Write {storage name: numpy or jax array} under `path` (which must not exist). Collective: every
    process calls it with its (sharded) arrays; each writes what it owns. The arrays must not change
    until it returns (orbax is told not to copy them: callers hand it a snapshot or wait)."""
    import jax
    import orbax.checkpoint as ocp
    _use_distributed_barriers()
    alone = jax.process_count() == 1
    with gc_paused(), ocp.Checkpointer(_write_handler(use_ocdbt=not alone)) as ckptr:
        ckptr.save(os.path.abspath(path), _nested(_on_host(tensors) if alone else tensors))


def _write_handler(use_ocdbt: bool):
    """No compression, no extra copy of host arrays; one zarr array (a directory) per tensor in a single
    process, orbax's OCDBT key-value store with several.

    Measured on the small model's 305 MB state in one process (writers alternated, session 3): OCDBT took
    1.6-1.8x as long as plain zarr arrays, zstd compression tripled the write time (moments and weights
    barely compress), and NumpyHandler's default deep copy of every array cost 0.1-0.25 s. With several
    processes OCDBT stays: there each process writes a few data files, where zarr arrays would hold a chunk
    file per tensor per process (an object per chunk in a bucket). Readers need no option: orbax tells
    the layouts apart."""
    import inspect

    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers as th
    no_copy = ({"deepcopy_host_arrays": False}     # not in orbax-checkpoint 0.12.4 (the GPU image)
               if "deepcopy_host_arrays" in inspect.signature(th.NumpyHandler).parameters else {})
    registry = th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(**no_copy)), (jax.Array, th.get_type_handler(jax.Array)))
    _quiet_ocdbt_merge()
    return ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_compression=False, type_handler_registry=registry)


def _on_host(tensors: dict) -> dict:
    """For a single-process write: each jax.Array that lives on one device goes to orbax as a host
    array; transfers start for all before any is waited for. On a CPU device that is a view of its
    buffer (no copy). Measured:
    - CPU: orbax's jax.Array writer spent ~0.8 ms of Python per array on shard and sharding
      bookkeeping, 0.18 s of a 0.6 s save for the small model's 226 arrays;
    - one H200, async save of the 1B state (bench/RESULTS_H200.md, session 3): with host arrays the 9
      training steps beside the write ran at full speed (median 0.478 s); through orbax's jax.Array writer
      they ran at 0.95 s (median of 5) and 0.96-3.7 s in session 2.
    JAX keeps the host copy with the array while the array lives: for an async save that is the
    snapshot (freed after the write); a blocking save's arrays are replaced by the next step.
    Arrays over several devices keep orbax's writer (a host array would gather them)."""
    import jax
    arrays = {k: v for k, v in tensors.items() if isinstance(v, jax.Array) and len(v.devices()) == 1}
    for v in arrays.values():
        v.copy_to_host_async()
    return {k: np.asarray(arrays[k]) if k in arrays else v for k, v in tensors.items()}


@functools.cache
def _quiet_ocdbt_merge() -> None:
    """orbax warns on every save without OCDBT that it found no per-process OCDBT files to merge."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record):
            return "Skipping merge of OCDBT checkpoints" not in record.getMessage()
    logging.getLogger("absl").addFilter(_Filter())


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
    with gc_paused(), ocp.PyTreeCheckpointer() as ckptr:   # partial_restore: read only the named tensors
        tree = ckptr.restore(os.path.abspath(path), args=ocp.args.PyTreeRestore(
            item=_nested({n: 0 for n in names}), restore_args=restore_args, partial_restore=True))
    flat = flatten(tree)
    return {n: flat[n.replace("/", ".")] for n in names}
