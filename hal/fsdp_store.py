"""Checkpoint I/O of a sharded PyTorch (FSDP2) state through hal.store, i.e. orbax over JAX.

Each rank's rows of a tensor (FSDP2 shards dim 0) become that rank's shard of a global jax.Array on a
CPU mesh (data, fsdp) over the same ranks, so every rank writes and reads only its own rows, and the
checkpoint is the one format every backend reads. A tensor whose dim 0 the fsdp axis does not divide is
written and read whole (replicated). Without FSDP2 (torch-neuronx over torch_xla) the mesh is
(data=ranks, fsdp=1): every rank holds, and reads, the whole tensor; orbax writes each array once.
JAX runs on the host CPU only, its processes joined through jax.distributed, whose coordinator port
rank 0 picks and shares over torch's host (gloo) group.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from hal import distributed, store


class RowShardStore:
    """mesh_sizes: the torch backend's {data, fsdp} sizes; share_from_rank0(value) returns rank 0's
    value on every rank (a torch collective), used once, to agree on the JAX coordinator's port."""

    def __init__(self, mesh_sizes: dict, process_index: int, share_from_rank0: Callable[[object], object]):
        self.data, self.fsdp = mesh_sizes["data"], mesh_sizes["fsdp"]
        self.process_index = process_index
        self._share = share_from_rank0
        self._mesh = None

    def row_sharded(self, shape: tuple) -> bool:
        return len(shape) > 0 and shape[0] % self.fsdp == 0

    def local_parts(self, tensors: dict) -> dict:
        """{name: (global shape, the tensor this rank writes)} of {name: torch tensor}: an FSDP2 DTensor's
        own rows, or its whole value where the fsdp axis does not divide dim 0 (gathered now: a
        collective); a plain tensor (no FSDP2: every process holds the whole state) as it is."""
        parts = {}
        for name, t in tensors.items():
            shape = tuple(t.shape)
            if hasattr(t, "full_tensor"):
                t = t.to_local() if self.row_sharded(shape) else t.full_tensor()
            parts[name] = (shape, t)
        return parts

    def start(self):
        """Start JAX on the CPU over every rank (collective; idempotent) and return the mesh. Call it on the
        training thread: a write on another thread must find it started."""
        if self._mesh is None:
            import jax
            from jax.sharding import Mesh
            jax.config.update("jax_platforms", "cpu")
            port = None
            if not jax.distributed.is_initialized():
                # MASTER_PORT + 1, JAX's default under torchrun, may be taken by anything on the host
                port = self._share(distributed.free_port() if self.process_index == 0 else None)
            distributed.initialize_jax("auto", coordinator_port=port)
            devices = sorted(jax.devices(), key=lambda dev: dev.process_index)
            self._mesh = Mesh(np.array(devices).reshape(self.data, self.fsdp), ("data", "fsdp"))
        return self._mesh

    def sharding(self, shape: tuple):
        from jax.sharding import NamedSharding, PartitionSpec as P
        return NamedSharding(self.start(), P("fsdp") if self.row_sharded(shape) else P())

    def write(self, path: str, rows: dict, whole: dict) -> dict:
        """Write {name: (global shape, this rank's rows: a NumPy array)} and {name: the same NumPy array on
        every rank} under `path` (collective); returns hal.store.write_and_describe's description."""
        import jax
        dev = jax.local_devices()[0]
        tensors = {n: jax.make_array_from_single_device_arrays(shape, self.sharding(shape), [jax.device_put(v, dev)])
                   for n, (shape, v) in rows.items()}
        tensors.update(whole)
        return store.write_and_describe(path, tensors, self.process_index)

    def read(self, path: str, shapes: dict, name, allreduce) -> tuple[dict, dict]:
        """Read {name: global shape} from `path` (collective): returns ({name: this rank's rows, or the whole
        tensor where it is replicated, as NumPy}, hal.store.summarize's {name: shape, dtype, digest} of
        the global tensors, its digests added over ranks with `allreduce`)."""
        shardings = {n: self.sharding(shape) for n, shape in shapes.items()}
        read = store.read_tensors(path, list(shapes), shardings=shardings, name=name)
        found = store.summarize(read, allreduce)
        return {n: np.asarray(arr.addressable_shards[0].data) for n, arr in read.items()}, found
