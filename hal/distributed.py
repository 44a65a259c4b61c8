"""Processes: how this one was launched, and each framework's process group started from that.

Launchers (torchrun, Slurm running torchrun, a TPU pod's runtime) describe the job in environment
variables; backends read them here only, as Keras 3's distribution_lib does for its backends. Under
torchrun: WORLD_SIZE processes, this one RANK (LOCAL_RANK of LOCAL_WORLD_SIZE on its host), torch's
rendezvous store at MASTER_ADDR:MASTER_PORT.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import socket


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @classmethod
    def from_environ(cls, environ=None) -> "LaunchEnv":
        env = os.environ if environ is None else environ
        return cls(world_size=int(env.get("WORLD_SIZE", "1")), rank=int(env.get("RANK", "0")),
                   local_rank=int(env.get("LOCAL_RANK", "0")),
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
                   master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", "29500")))

    @property
    def multi_process(self) -> bool:
        return self.world_size > 1


def launch_env() -> LaunchEnv:
    """This process's launch environment, read now."""
    return LaunchEnv.from_environ()


def initialize_jax(mode="auto", coordinator_port: int | None = None) -> None:
    """jax.distributed.initialize() for multi-process runs.

    mode auto: initialize when launched as several processes — by torchrun-style variables (the JAX
    coordinator listens on `coordinator_port`; by default a free port rank 0 picks and shares through
    torchrun's own store, else MASTER_PORT + 1) or by a cluster JAX detects itself (TPU pods, SLURM).
    true: always; false: never.
    """
    import jax
    if mode is False or mode == "false" or jax.distributed.is_initialized():
        return
    env = launch_env()
    if env.multi_process:
        if os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu") or jax.config.jax_platforms == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        port = coordinator_port or _agent_store_port(env) or env.master_port + 1
        jax.distributed.initialize(coordinator_address=f"{env.master_addr}:{port}", num_processes=env.world_size,
                                   process_id=env.rank)
    elif mode is True or mode == "true":
        jax.distributed.initialize()


def comm_backend(platform: str, process_group_backend: str | None = None) -> str:
    """The torch.distributed backend for a platform: gloo on CPUs, nccl on GPUs; on Trainium the Neuron
    stack's own (`process_group_backend` of its hooks)."""
    if platform == "neuron":
        return process_group_backend
    return {"cpu": "gloo", "gpu": "nccl"}[platform]


def initialize_torch(backend: str, env: LaunchEnv) -> tuple[int, int]:
    """Join torch's process group when launched as several processes, and make the host group beside it
    (`host_group`); returns (rank, world size)."""
    if not env.multi_process:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend)
        atexit.register(_leave_process_group)
    host_group()
    return dist.get_rank(), env.world_size


EXIT_BARRIER_S = 10.0


def _leave_process_group() -> None:
    """At exit: wait (a bounded time) for the other ranks to exit too, then destroy the process groups.

    A collective's work object can outlive the call that waited for it: gloo's worker thread drops it a
    moment later, and dropping it releases tensors that Python owns, which needs the GIL. Past this point
    the interpreter finalizes, and a worker thread that asks for the GIL then aborts the process
    ("terminate called without an active exception"). The barrier blocks without the GIL, so those
    threads finish first, and no rank closes its sockets while a peer still talks. It is monitored: a rank
    that never comes (one that failed alone) costs EXIT_BARRIER_S, never a hang."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    _exit_barrier(dist)
    _HOST_GROUP.clear()
    dist.destroy_process_group()


def _exit_barrier(dist) -> None:
    """monitored_barrier on the host group (gloo); a timeout or a peer already gone is not an error here."""
    import datetime
    try:
        dist.monitored_barrier(group=host_group(), timeout=datetime.timedelta(seconds=EXIT_BARRIER_S),
                               wait_all_ranks=True)
    except RuntimeError:
        pass


_HOST_GROUP = {}


def host_group():
    """The process group for collectives on host (CPU) tensors and objects: the default group when it is
    gloo, else a gloo group over the same ranks. Device backends (nccl, xla, neuron) may have no CPU
    implementation ("No backend type associated with device type cpu"). Made on the first call, which
    every rank must reach at the same point (initialize_torch makes it)."""
    import torch.distributed as dist
    world = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return world
    if world not in _HOST_GROUP:
        _HOST_GROUP[world] = dist.new_group(backend="gloo")
    return _HOST_GROUP[world]


def sum_over_ranks(values):
    """The element-wise uint64 sum (wrapping) of a NumPy uint64 array over all ranks (collective, on the
    host group). Sent as 32-bit halves in int64 tensors: gloo has no unsigned 64-bit sum."""
    import numpy as np
    import torch
    import torch.distributed as dist
    halves = torch.from_numpy(np.ascontiguousarray(values, np.uint64).view(np.uint32).astype(np.int64))
    parts = [torch.zeros_like(halves) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, halves, group=host_group())
    stacked = np.stack([p.numpy().astype(np.uint32) for p in parts])
    return stacked.view(np.uint64).sum(axis=0, dtype=np.uint64)


def from_rank0(value):
    """Rank 0's picklable `value`, on every rank (collective, on the host group)."""
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, src=0, group=host_group())
    return box[0]


def host_barrier() -> None:
    """Every rank waits for all the others (collective, on the host group)."""
    import torch.distributed as dist
    dist.barrier(group=host_group())


def _agent_store_port(env: LaunchEnv) -> int | None:
    """Under torchrun: a port free on rank 0's host, picked by rank 0 and read by the others from torchrun's
    rendezvous store (a fixed MASTER_PORT + 1 may be taken by anything on the host). None elsewhere."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import datetime
    from torch.distributed import TCPStore
    store = TCPStore(env.master_addr, env.master_port, is_master=False, timeout=datetime.timedelta(seconds=300))
    key = (f"trichip/jax-coordinator/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
           f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    if env.rank == 0:
        store.set(key, str(free_port()))
    return int(store.get(key))


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
