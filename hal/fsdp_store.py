"""Checkpoint I/O of a sharded PyTorch (FSDP2 x tensor parallel) state through hal.store, i.e. orbax over JAX.

Each rank's part of a tensor (one block of the global array: hal.torch_parallel.storage_spec) becomes that
rank's shard of a global jax.Array on a CPU mesh (data, fsdp, tensor) over the same ranks in the same
order, so every rank writes and reads only the block it holds, and the checkpoint is the one format every
backend reads. A tensor whose part is not an even block (a dim the fsdp axis does not divide) is written
and read whole (replicated). Without FSDP2 (torch-neuronx over torch_xla) the mesh is (data=ranks, 1, 1):
every rank holds, and reads, the whole tensor; orbax writes each array once.
JAX runs on the host CPU only, its processes joined through jax.distributed, whose coordinator port
rank 0 picks and shares over torch's host (gloo) group.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from hal import distributed, store
from hal.mesh import AXES
from hal.torch_parallel import storage_spec


class ShardStore:
    """mesh_sizes: the torch backend's {data, fsdp, tensor} sizes; tensor_dims: {storage name: the dim the
    tensor axis splits, or None}; share_from_rank0(value) returns rank 0's value on every rank (a torch
    collective), used once, to agree on the JAX coordinator's port."""

    def __init__(self, mesh_sizes: dict, process_index: int, share_from_rank0: Callable[[object], object],
                 tensor_dims: dict | None = None):
        self.sizes = {a: mesh_sizes[a] for a in AXES}
        self.tensor_dims = tensor_dims or {}
        self.process_index = process_index
        self._share = share_from_rank0
        self._mesh = None

    def spec(self, name: str, shape: tuple) -> tuple | None:
        """This rank's block of `name` as a PartitionSpec tuple, or None: written and read whole."""
        return storage_spec(shape, self.tensor_dims.get(name), self.sizes)

    def sharded(self, name: str, shape: tuple) -> bool:
        return bool(self.spec(name, shape) and any(self.spec(name, shape)))

    def local_parts(self, tensors: dict) -> dict:
        """{name: (global shape, the tensor this rank writes)} of {name: torch tensor}: a DTensor's own
        block, or its whole value where its part is not an even block (gathered now: a collective); a
        plain tensor (held whole by every process) as it is."""
        parts = {}
        for name, t in tensors.items():
            shape = tuple(t.shape)
            if hasattr(t, "full_tensor"):
                t = t.to_local() if self.sharded(name, shape) else t.full_tensor()
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
            self._mesh = Mesh(np.array(devices).reshape([self.sizes[a] for a in AXES]), AXES)
        return self._mesh

    def sharding(self, name: str, shape: tuple):
        from jax.sharding import NamedSharding, PartitionSpec as P
        return NamedSharding(self.start(), P(*(self.spec(name, shape) or ())))

    def write(self, path: str, rows: dict, whole: dict) -> dict:
        """Write {name: (global shape, this rank's block: a NumPy array)} and {name: the same NumPy array on
        every rank} under `path` (collective); returns hal.store.write_and_describe's description."""
        import jax
        dev = jax.local_devices()[0]
        tensors = {n: jax.make_array_from_single_device_arrays(shape, self.sharding(n, shape),
                                                               [jax.device_put(v, dev)])
                   for n, (shape, v) in rows.items()}
        tensors.update(whole)
        return store.write_and_describe(path, tensors, self.process_index)

    def read(self, path: str, shapes: dict, name, allreduce) -> tuple[dict, dict]:
        """Read {name: global shape} from `path` (collective): returns ({name: this rank's block, or the whole
        tensor where it is replicated, as NumPy}, hal.store.summarize's {name: shape, dtype, digest} of
        the global tensors, its digests added over ranks with `allreduce`)."""
        shardings = {n: self.sharding(n, shape) for n, shape in shapes.items()}
        read, found = store.read_and_summarize(path, list(shapes), shardings=shardings, name=name,
                                               allreduce=allreduce)
        return {n: np.asarray(arr.addressable_shards[0].data) for n, arr in read.items()}, found
