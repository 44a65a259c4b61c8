"""Tensor storage for checkpoints: orbax-checkpoint over tensorstore (zarr arrays; OCDBT with several processes).

Tensors are one nested tree keyed by storage names ("params/model.layers.0.mlp.up_proj.weight",
"opt/mu/...", "opt/count"); any backend reads them without knowing who wrote them.

Sharded jax.Arrays are written by the processes that hold them (nothing is gathered) and restored
straight into a target sharding (resharding on load). Each tensor gets a 64-bit digest that is a sum
over elements of a hash of (global position, bits): every process digests the shards it owns, the
sums add up, and the result is the same for any sharding — so a checkpoint written on 8 devices is
verified on 2 processes. Digests run on the host CPU, beside the write or the read.

A checkpoint one process wrote (a zarr array per tensor) is read back by tensorstore directly, the way orbax
reads it but without orbax's per-tensor bookkeeping (read_and_summarize); OCDBT checkpoints and reads of
sharded arrays by several processes go through orbax.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import gc
import math
import os
import re
import sys
import threading

import numpy as np

from models.errors import CheckpointDamaged, StorageError, first_line
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
    Packing is there because XLA:CPU compiles the 32->64-bit conversion fused into the sum poorly."""
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
    """The jitted digest pass: one fused pass, where NumPy makes ten over uint64 temporaries. On the CPU it
    is compiled for 512-bit vectors, which XLA does not prefer by default but which suit the 64-bit
    multiplies; a compile option of this kernel alone, not of the model's."""
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

    `values` is a NumPy array or a single-device jax.Array; either is digested on the host CPU (an
    accelerator's array is moved to the host first: a kernel on the device would queue on the stream the
    training steps run on, and TPUs and Neuron emulate or narrow 64-bit integers). The value is
    digest_reference's: a sum over elements of a 64-bit mix of (global position, bits)."""
    import jax
    shape = tuple(values.shape) if shape is None else tuple(shape)
    if isinstance(values, jax.Array) and next(iter(values.devices())).platform != "cpu":
        values = np.asarray(values)      # waits for the transfer (started by _sum_parts); the GIL is released
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
    import jax
    for shards in jobs:        # accelerator shards go to the host: every transfer started before any is waited for
        for values, _, _ in shards:
            if isinstance(values, jax.Array) and next(iter(values.devices())).platform != "cpu":
                values.copy_to_host_async()
    pending = [[_digest_future(*job) for job in shards] for shards in jobs]   # all dispatched, then waited for
    return np.array([sum(int(p) for p in ps) % 2**64 for ps in pending], np.uint64)


def write_and_describe(path: str, tensors: dict, process_index: int = 0) -> dict:
    """write_tensors, and {name: {shape, dtype, part}} with `part` this process's share of the tensor's
    digest (see _shard_jobs), computed beside the write (both release the GIL). The
    shards are taken here first: a jax.Array's shard list is built lazily, and building it from two
    threads at once handed orbax a wrong object. A single process moves single-device arrays to the
    host first (_on_host): the host arrays are what is digested and what is written."""
    from concurrent.futures import ThreadPoolExecutor

    import jax
    if jax.process_count() == 1:
        tensors = _on_host(tensors)
    jobs = _shard_jobs(tensors, process_index)
    with ThreadPoolExecutor(1, thread_name_prefix="digests") as pool:
        parts = pool.submit(_sum_parts, jobs)
        write_tensors(path, tensors)
        return _described(tensors, parts.result())


def _described(tensors: dict, parts: np.ndarray) -> dict:
    return {k: dict(_shape_dtype(v), part=int(p)) for (k, v), p in zip(tensors.items(), parts)}


def _shape_dtype(value) -> dict:
    """{"shape": [...], "dtype": "..."} of a NumPy array, NumPy scalar or jax.Array (its global shape)."""
    dtype = np.asarray(value).dtype if isinstance(value, (np.ndarray, np.generic, int, float)) else value.dtype
    return {"shape": list(np.shape(value)), "dtype": str(dtype)}


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
    full collections, each a walk over every object torch and JAX keep alive, a noticeable part of a
    save. Reference counting still frees what it can; collection resumes when the last of any
    overlapping writers and readers (threads) ends, if it was on when the first began."""
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

    In one process plain zarr arrays write faster than OCDBT, compression costs far more time than it
    saves (moments and weights barely compress), and NumpyHandler's default deep copy of every array is
    pure overhead (bench/RESULTS.md). With several processes OCDBT stays: there each process writes a
    few data files, where zarr arrays would hold a chunk file per tensor per process (an object per
    chunk in a bucket). Readers need no option: orbax tells the layouts apart."""
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
    buffer (no copy). orbax's jax.Array writer spends Python time on shard and sharding bookkeeping for
    every array, and on a GPU it slows the training steps that run beside an async save; host arrays
    avoid both (bench/RESULTS.md, bench/RESULTS_H200.md).
    JAX keeps the host copy with the array while the array lives: for an async save that is the
    snapshot (freed after the write); a blocking save's arrays are replaced by the next step.
    Arrays over several devices keep orbax's writer (a host array would gather them)."""
    import jax
    arrays = {k: v for k, v in tensors.items() if isinstance(v, jax.Array) and len(v.devices()) == 1}
    host = {}
    for window in _windows(list(arrays.values()), _TRANSFER_WINDOW):
        for v in window:
            v.copy_to_host_async()
        host.update((id(v), np.asarray(v)) for v in window)
    return {k: host[id(arrays[k])] if k in arrays else v for k, v in tensors.items()}


# Bytes of device-to-host transfers a save keeps in flight at once. An accelerator has one transfer queue
# to the host: the training step's own small reads (its loss) wait behind whatever is queued there, so a
# save that queued the whole state at once held the steps beside it for as long as the transfer took.
_TRANSFER_WINDOW = 256 * 2 ** 20


def _windows(arrays: list, limit: int) -> list[list]:
    """`arrays` in consecutive groups of at most `limit` bytes (one array alone where it is larger)."""
    groups, size = [[]], 0
    for v in arrays:
        if groups[-1] and size + v.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(v)
        size += v.nbytes
    return [g for g in groups if g]


@functools.cache
def _quiet_ocdbt_merge() -> None:
    """orbax warns on every save without OCDBT that it found no per-process OCDBT files to merge."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record):
            return "Skipping merge of OCDBT checkpoints" not in record.getMessage()
    logging.getLogger("absl").addFilter(_Filter())


def read_tensors(path: str, names: list[str], shardings: dict | None = None, name=None) -> dict:
    """Read the named tensors: as host NumPy arrays, or as jax.Arrays placed with `shardings[name]`
    (only the shards this process holds are read).

    A checkpoint's files that are missing or malformed raise CheckpointDamaged; files that exist but
    cannot be read (permissions, I/O errors) raise StorageError. `name`: how messages call the
    checkpoint (default: the directory holding `path`)."""
    import orbax.checkpoint as ocp
    name = name or os.path.dirname(os.path.abspath(path))

    def args(tensor):
        if shardings is None:
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.ArrayRestoreArgs(sharding=shardings[tensor])
    absent = object()          # what partial_restore hands back for a name the checkpoint does not hold
    restore_args = _nested({n: args(n) for n in names})
    _use_distributed_barriers()
    try:
        with gc_paused(), ocp.PyTreeCheckpointer() as ckptr:   # partial_restore: read only the named tensors
            tree = ckptr.restore(os.path.abspath(path), args=ocp.args.PyTreeRestore(
                item=_nested({n: absent for n in names}), restore_args=restore_args, partial_restore=True))
    except Exception as e:     # noqa: BLE001  (orbax and tensorstore raise many types; sorted out here)
        error = _read_error(e, path, names, name)
        if error is e:
            raise
        raise error from e
    flat = flatten(tree)
    out = {n: flat.get(n.replace("/", "."), absent) for n in names}
    missing = [n for n, v in out.items() if v is absent]
    if missing:
        raise CheckpointDamaged(f"checkpoint {name} is damaged: tensor {missing[0]} is missing from its state/")
    return out


def read_and_summarize(path: str, names: list[str], shardings: dict | None = None, name=None,
                       allreduce=None) -> tuple[dict, dict]:
    """read_tensors and summarize together: ({name: array}, {name: {shape, dtype, digest}}).

    A checkpoint one process wrote (a plain zarr array per tensor) is read by tensorstore straight into
    64-byte aligned host arrays, every read issued at once; each tensor's digest is dispatched as soon as
    its read is done, so the digests of early tensors run while later ones are still read. Where
    `shardings` are given the verified host arrays are then placed with them. Other checkpoints (OCDBT,
    several processes reading their shards) go through orbax: read_tensors, then summarize."""
    if _plain_zarr(path):
        tensors, found = _read_plain(path, names, name or os.path.dirname(os.path.abspath(path)))
        if shardings is not None:
            import jax
            tensors = {n: jax.device_put(v, shardings[n]) for n, v in tensors.items()}
        return tensors, found
    tensors = read_tensors(path, names, shardings, name)
    return tensors, summarize(tensors, allreduce)


def _plain_zarr(path: str) -> bool:
    """A single process reads a checkpoint whose tensors are zarr arrays of their own (no OCDBT)."""
    import jax
    return (jax.process_count() == 1 and os.path.isfile(os.path.join(path, "_METADATA"))
            and not os.path.exists(os.path.join(path, "manifest.ocdbt")))


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialized array whose data starts on a 64-byte boundary: the digest kernel (JAX on the host
    CPU) then reads it in place, and torch.from_numpy shares it."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _zarr_spec(array_dir: str) -> dict:
    """The tensorstore spec orbax reads a single-process array with: zarr (v2) or zarr3, a missing chunk
    an error rather than a fill value."""
    driver = "zarr3" if os.path.isfile(os.path.join(array_dir, "zarr.json")) else "zarr"
    return {"driver": driver, "kvstore": {"driver": "file", "path": array_dir + "/"},
            "recheck_cached_data": False, "recheck_cached_metadata": False, "fill_missing_data_reads": False}


def _present(tensor_dir: str, name) -> bool:
    """Whether a tensor's directory exists: False only where it is proven absent; a directory that cannot
    be looked at (an I/O error, a stale mount) is a StorageError, not damage."""
    try:
        os.stat(tensor_dir)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StorageError(f"checkpoint {name}: cannot read {tensor_dir} ({_brief(e)})") from e


def _read_plain(path: str, names: list[str], name) -> tuple[dict, dict]:
    """Read a plain-zarr checkpoint's tensors into aligned host arrays, digests overlapping the reads."""
    import tensorstore as ts
    dirs = {n: os.path.join(os.path.abspath(path), n.replace("/", ".")) for n in names}
    missing = [n for n, d in dirs.items() if not _present(d, name)]
    if missing and not _unreadable(path):
        raise CheckpointDamaged(f"checkpoint {name} is damaged: tensor {missing[0]} is missing from its state/")
    try:
        with gc_paused():
            stores = [f.result() for f in [ts.open(_zarr_spec(d), open=True) for d in dirs.values()]]
            out = [_aligned_empty(tuple(s.shape), s.dtype.numpy_dtype) for s in stores]
            reads = [ts.array(o, copy=False).write(s) for o, s in zip(out, stores)]
            pending = []
            for o, r in zip(out, reads):
                r.result()
                pending.append(_digest_future(o))        # dispatched; runs while later reads go on
            parts = [int(p) for p in pending]
    except Exception as e:     # noqa: BLE001  (tensorstore raises ValueError with a status code; sorted out here)
        error = _read_error(e, path, names, name)
        if error is e:
            raise
        raise error from e
    tensors = dict(zip(names, out))
    return tensors, {n: dict(_shape_dtype(v), digest=p) for (n, v), p in zip(tensors.items(), parts)}


def summarize(tensors: dict, allreduce=None) -> dict:
    """{name: {"shape", "dtype", "digest"}} of tensors that were read: what hal.layout.verify compares with
    a manifest. With several processes, `allreduce` adds the digest parts (see digests)."""
    found = digests(tensors, allreduce)
    return {n: dict(_shape_dtype(v), digest=found[n]) for n, v in tensors.items()}


# The status codes tensorstore and XLA start their messages with; the first five prove a file missing or malformed.
_DAMAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "INVALID_ARGUMENT", "OUT_OF_RANGE")
_STATUS = re.compile(r"\b(" + "|".join(_DAMAGE_CODES + (
    "CANCELLED", "UNKNOWN", "DEADLINE_EXCEEDED", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
    "ABORTED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "UNAUTHENTICATED")) + r"): ")
_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


def _read_error(e: Exception, path: str, names: list[str], name) -> Exception:
    """What a failed read means. StorageError: a file exists but cannot be read (permissions, an I/O error).
    CheckpointDamaged: a file the checkpoint needs is missing or malformed. Anything else (out of memory,
    a collective that timed out) is handed back as it is."""
    text = str(e)
    status = _STATUS.search(text)
    code = status.group(1) if status else None
    os_error = _OS_ERROR.search(text)
    missing = isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) or code == "NOT_FOUND"
    if missing:
        # orbax reports an unreadable directory as a missing file: look before calling it damage
        blocked = _unreadable(path)
        if blocked:
            return StorageError(f"checkpoint {name}: cannot read {blocked} (permission denied)")
    elif (isinstance(e, OSError) or code == "PERMISSION_DENIED"
          or (os_error is not None and int(os_error.group(1)) != errno.ENOENT)):
        return StorageError(f"checkpoint {name}: cannot read its tensors ({_brief(e)})")
    elif (code is not None and code not in _DAMAGE_CODES) or isinstance(e, (RuntimeError, MemoryError)):
        return e
    tensor = _tensor_named_in(text, names)
    what = f"tensor {tensor}" if tensor else "its state/"
    return CheckpointDamaged(f"checkpoint {name} is damaged: {what} cannot be read ({_brief(e)})")


def _brief(e: Exception) -> str:
    """The first line of a read error, without the tensorstore spec it may end with."""
    return first_line(e, limit=1000).split(" [tensorstore_spec=")[0][:300]


def _unreadable(path: str) -> str | None:
    """The first directory or file at or under `path` that this process may not read, if any."""
    def blocked(p: str, is_dir: bool) -> bool:
        try:
            os.listdir(p) if is_dir else open(p, "rb").close()
        except PermissionError:
            return True
        except OSError:
            return False
        return False
    if os.path.isdir(path) and blocked(path, True):
        return path
    for root, dirs, files in os.walk(path):
        for entry, is_dir in [(d, True) for d in dirs] + [(f, False) for f in files]:
            if blocked(os.path.join(root, entry), is_dir):
                return os.path.join(root, entry)
    return None


def _tensor_named_in(text: str, names: list[str]) -> str | None:
    """The storage name whose files an error message points at (the longest match), if any."""
    hits = [n for n in names if n.replace("/", ".") in text]
    return max(hits, key=len) if hits else None
