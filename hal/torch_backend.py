"""PyTorch backend: the same Llama in torch, torch.optim.AdamW (weight decay on 2-D weights), and, when launched by
torchrun (GPU: nccl, CPU: gloo), a (data, fsdp, tensor) DeviceMesh: tensor and sequence parallelism over
`tensor` (hal.torch_parallel), FSDP2 (`fully_shard` per transformer block and at the root) over fsdp,
hybrid (replicate x shard) when data > 1."""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

from hal import compile_cache, distributed, layout, neuron, store, torch_parallel
from hal import mesh as meshlib
from hal.base import Backend, HostState, OptimizerSpec, Snapshot, StepMetrics, UserError, check_fp8, loss_chunk_under
from hal.fsdp_store import ShardStore
from hal.host_buffers import HostBufferPool
from models.spec import LlamaConfig, decays

log = logging.getLogger(__name__)


def _select_device(platform: str, local_rank: int, hooks: "neuron.NeuronHooks | None"):
    import torch
    if platform == "auto":
        platform = "gpu" if torch.cuda.is_available() else "cpu"
    if platform == "cpu":
        return "cpu", torch.device("cpu")
    if platform == "gpu":
        if not torch.cuda.is_available():
            raise UserError("hal.platform=gpu but torch sees no CUDA device (torch.cuda.is_available() is False); "
                            "install a CUDA build of torch or use hal.platform=cpu")
        torch.cuda.set_device(local_rank)
        return "gpu", torch.device("cuda", local_rank)
    if platform == "neuron":   # never run on Trainium hardware here: see hal/neuron.py
        if hooks.stack == "torch-xla":
            import torch_xla
            return "neuron", torch_xla.device()
        return "neuron", torch.device("neuron", 0)   # NEURON_RT_VISIBLE_CORES maps this rank's cores to 0
    raise UserError(f"hal.platform={platform!r} is not one of auto, cpu, gpu, neuron for hal=torch")


def _keep_jax_on_the_host() -> None:
    """Checkpoints go through orbax, i.e. JAX, on the host CPU. Unless told otherwise JAX starts every
    backend it finds: a CUDA JAX takes the GPU's memory, and with libneuronxla installed a `neuron` PJRT
    client claims NeuronCores this process's torch uses. So a torch process pins JAX to the CPU before
    JAX is imported; a process that has imported JAX already (a tool or test using both frameworks)
    chose its platforms itself."""
    import sys
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"


def _torch_mesh(mesh: dict | None, mesh_rule: str, instance_type: str | None, world: int,
               fsdp2: bool = True) -> tuple[dict, str]:
    """The (data, fsdp, tensor) mesh and where it came from: hal.mesh, else the platform rule (its tensor
    axis used as written), else FSDP over every process. Without FSDP2 (torch-neuronx over torch_xla)
    every process holds the whole state: data parallel only."""
    if not fsdp2:
        if mesh and any(mesh.get(axis, 1) != 1 for axis in ("fsdp", "tensor")):
            raise UserError(f"this torch stack has no FSDP2 (every process holds the whole state): set "
                            f"hal.mesh.fsdp=1 and hal.mesh.tensor=1 (mesh {dict(mesh)})")
        return ({"data": world, "fsdp": 1, "tensor": 1},
                "replicated: data parallel over every process (this stack has no FSDP2)")
    return meshlib.choose(mesh, mesh_rule, meshlib.instance_type(instance_type), world)


def _bytes_line(parts: dict) -> str:
    """{part: bytes} as 'params 1.2 MiB, optimizer 2.4 MiB, ...' for the log."""
    return ", ".join(f"{name} {n / 2 ** 20:.2f} MiB" for name, n in parts.items())


def _numpy_float32(t) -> np.ndarray:
    """A CPU tensor as a float32 NumPy array: a view where it is float32, else a converted copy."""
    import torch
    return (t if t.dtype == torch.float32 else t.float()).numpy()


def _register_pinned_memory_in_threads(torch) -> None:
    """Pinned host memory for a multi-GB state: torch's caching host allocator makes it by default with
    cudaHostAlloc, several times slower than memory allocated normally and then registered with CUDA by 8
    threads (its allocator options pinned_use_cuda_host_register, pinned_num_register_threads; figures in
    bench/RESULTS.md). Set where the user has not chosen: PYTORCH_CUDA_ALLOC_CONF names neither. The setter
    is private to torch (the public way is the environment variable, read once when CUDA starts, which a
    library cannot count on setting first); without it only the speed of the first save changes."""
    if "pinned_" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    try:
        torch.cuda.memory._set_allocator_settings("pinned_use_cuda_host_register:True,pinned_num_register_threads:8")
    except (AttributeError, RuntimeError) as e:      # a torch without the options: only speed depends on them
        log.debug("pinned host memory: the default allocation (%s)", e)


def _is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def _copies(t, world: int) -> int:
    """How many ranks hold the same values as this rank's part of `t`: for a DTensor, the ranks that differ
    only in mesh dims that do not shard it (and those outside its mesh); for a plain tensor, every rank."""
    if not _is_dtensor(t):
        return world
    shards = 1
    for size, placement in zip(t.device_mesh.shape, t.placements):
        if not (placement.is_replicate() or placement.is_partial()):   # Shard, or FSDP2's _StridedShard
            shards *= size
    return world // shards


class TorchBackend(Backend):
    framework = "torch"

    def __init__(self, model: LlamaConfig, optim: OptimizerSpec, precision: str = "fp32",
                 platform: str = "auto", remat: bool = False, mesh: dict | None = None,
                 mesh_rule: str = "auto", instance_type: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor", neuron_cfg: dict | None = None,
                 document_eos: int | None = None, compile_cache_dir: str | None = None, loss_chunk: int = 0):
        super().__init__(model, optim, precision)
        import torch
        import torch.distributed as dist
        from models.llama_torch import cross_entropy

        self._torch, self._dist, self._cross_entropy = torch, dist, cross_entropy
        env = distributed.launch_env()
        self.hooks = None
        if platform == "neuron":
            self.hooks = neuron.setup("torch", precision, neuron_cfg, instance_type, env.local_rank,
                                      env.local_world_size)
            compile, compile_backend = neuron.compile_choice(self.hooks, compile, compile_backend)
        self.platform, self.device = _select_device(platform, env.local_rank, self.hooks)
        _keep_jax_on_the_host()
        if self.platform == "gpu":
            # checkpoints go through orbax, i.e. JAX (on the host CPU here): a CUDA JAX in this process must
            # not take the GPU's memory up front as it does by default (before JAX starts: no effect after)
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        # On CPUs torch's OpenMP threads spin-wait, so a checkpoint write on a second thread slows the steps
        # beside it by more than a blocking save costs (bench/RESULTS.md): block there. Neuron (torch-xla /
        # TorchNeuron) blocks too: a second thread beside its graphs is untested.
        self.async_save_default = self.platform == "gpu"
        self._bytes_logged = False
        self.distributed = env.multi_process
        self.comm_backend = distributed.comm_backend(self.platform, self.hooks and self.hooks.process_group_backend)
        self.process_index, self.process_count = distributed.initialize_torch(self.comm_backend, env)
        self.mesh_sizes, self.mesh_source = _torch_mesh(mesh, mesh_rule, instance_type, env.world_size,
                                                        fsdp2=self.hooks is None or self.hooks.supports_fsdp2)
        meshlib.check_tensor_degree(model, self.mesh_sizes["tensor"], "torch")
        if precision == "fp8":
            self._check_fp8()
        self._tensor_dims = torch_parallel.tensor_dims(model, self.mesh_sizes["tensor"])
        self._vocab_parallel = torch_parallel.vocab_parallel(model, self.mesh_sizes["tensor"])
        self._rows = ShardStore(self.mesh_sizes, self.process_index, self._from_rank0,
                                {key(n): d for n, d in self._tensor_dims.items()
                                 for key in (layout.param_key, layout.mu_key, layout.nu_key)})
        if compile and compile_backend == "inductor":    # torch.compile's persistent caches (hal/compile_cache.py)
            cache = compile_cache.configure_torch(compile_cache_dir)
            self.compile_cache_dir = cache and str(cache)
        self.net = self._build_net(remat, compile, compile_backend, document_eos, loss_chunk)
        self.opt = self._build_optimizer(optim)

    def _build_net(self, remat: bool, compile: bool, compile_backend: str, document_eos: int | None,
                   loss_chunk: int):
        """The model on this backend's device: tensor-parallel over the mesh's tensor axis, FSDP2-sharded
        over its data x fsdp axes, compiled per block with `compile` (as torchtitan does: one graph reused
        by every block). Document masks go through flex_attention on CUDA (blocks across documents
        skipped), SDPA with a boolean mask elsewhere. The loss is chunked (loss_chunk tokens a chunk, inside
        the root's forward, where FSDP2 has unsharded the output weight) except under tensor parallelism."""
        from models.llama_torch import LlamaForCausalLM
        with self._torch.device("meta"):
            net = LlamaForCausalLM(self.model, document_eos)
        if self.precision == "fp8":
            self._convert_fp8(net)
        net.activation_checkpointing = remat
        net.flex_attention = self.device.type == "cuda"
        net.loss_chunk = loss_chunk_under(loss_chunk, self.mesh_sizes["tensor"])
        self.device_mesh, self.fsdp = None, False
        if self.distributed and (self.hooks is None or self.hooks.supports_fsdp2):
            self.device_mesh = self._device_mesh()
            if self.mesh_sizes["tensor"] > 1:
                torch_parallel.parallelize(net, self.device_mesh["tensor"], self.model)
        if compile:
            for layer in net.model.layers:
                layer.compile(backend=compile_backend)
        self.compiled = compile
        if self.device_mesh is not None and self.mesh_sizes["data"] * self.mesh_sizes["fsdp"] > 1:
            net = self._fully_shard(net)
        return net.to_empty(device=self.device)

    def _check_fp8(self) -> None:
        """trainer.precision=fp8 needs a CUDA GPU of compute capability 8.9+ and no tensor parallelism (the
        float8 Linear layers would need torchao's float8 tensor-parallel styles)."""
        torch = self._torch
        cuda = self.device.type == "cuda" and not torch.version.hip
        check_fp8(torch.cuda.get_device_name(self.device) if cuda else self.platform,
                  torch.cuda.get_device_capability(self.device) if cuda else None)
        if self.mesh_sizes["tensor"] > 1:
            raise UserError(f"trainer.precision=fp8 on torch does not combine with tensor parallelism "
                            f"(hal.mesh.tensor={self.mesh_sizes['tensor']}): use hal.mesh.tensor=1 or precision bf16")

    def _convert_fp8(self, net) -> None:
        """The blocks' Linear layers become torchao Float8Linear (models.llama_torch.convert_to_fp8), before
        compile and FSDP2 wrap them; the rest computes in bf16 as trainer.precision=bf16 does. FSDP2
        all-gathers their weights in bf16 and each block casts them to float8: torchao's float8 all-gather
        (enable_fsdp_float8_all_gather) stays off, since it wraps the parameters in a tensor subclass that the
        state and checkpoint paths here do not handle, needs a scale precompute after every optimizer step,
        and saves all-gather bandwidth only where the weights are sharded over many GPUs."""
        from models.llama_torch import convert_to_fp8
        names = convert_to_fp8(net)
        log.info("trainer.precision=fp8: %d Linear layers of the blocks in float8 (torchao Float8Linear); "
                 "the output layer and embedding in bf16", len(names))

    def _device_mesh(self):
        """The DeviceMesh over every process: (data, fsdp, tensor), rank-major in that order (a tensor group
        is consecutive ranks, e.g. the NeuronCores of one chip or the GPUs of one NVLink domain)."""
        from torch.distributed.device_mesh import init_device_mesh
        shape = tuple(self.mesh_sizes[a] for a in meshlib.AXES)
        return init_device_mesh(self.device.type, shape, mesh_dim_names=meshlib.AXES)

    def _build_optimizer(self, optim: OptimizerSpec):
        """AdamW with weight decay on 2-D weights only. lr is set before every step from the trainer's
        schedule; 0.0 here is never used. On CPU and CUDA the fused kernel updates every tensor of a group in
        one pass, much faster than the per-tensor loop; it takes DTensors and plain tensors in separate
        groups (tensor parallelism without FSDP2 keeps a vocabulary it does not split as plain tensors)."""
        named = dict(self.net.named_parameters())
        self._names = list(named)
        groups = []
        for decay in (True, False):
            for dtensor in (True, False):
                params = [p for n, p in named.items()
                          if decays(n, tuple(p.shape)) == decay and _is_dtensor(p) == dtensor]
                if params:
                    groups.append({"params": params, "weight_decay": optim.weight_decay if decay else 0.0})
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        return self._torch.optim.AdamW(groups, lr=0.0, betas=(optim.b1, optim.b2), eps=optim.eps, **fused)

    def _from_rank0(self, value):
        """Rank 0's `value`, on every rank (collective, on the host group)."""
        return distributed.from_rank0(value)

    def _fully_shard(self, net):
        """FSDP2: one unit per decoder block, the root (embeddings, final norm, head) last; hybrid (replicate
        over data, shard over fsdp) when data > 1."""
        torch = self._torch
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        fsdp_mesh = self.device_mesh["data", "fsdp"] if self.mesh_sizes["data"] > 1 else self.device_mesh["fsdp"]
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision in ("bf16", "fp8") else MixedPrecisionPolicy()
        for layer in net.model.layers:
            fully_shard(layer, mesh=fsdp_mesh, mp_policy=mp)
        fully_shard(net, mesh=fsdp_mesh, mp_policy=mp)
        self.fsdp = True
        return net

    def _batch_groups(self) -> int:
        """Processes that read different rows: data x fsdp (the ranks of one tensor group read the same)."""
        return self.process_count // self.mesh_sizes["tensor"]

    def check_batch(self, micro_batch: int) -> None:
        self._micro_batch = micro_batch
        groups = self._batch_groups()
        if micro_batch % groups:
            raise UserError(f"trainer.micro_batch ({micro_batch}) must be a multiple of the mesh's data x fsdp "
                            f"size ({groups}, mesh {self.mesh_sizes}); change the batch or hal.mesh")

    def _autocast(self):
        if self.precision in ("bf16", "fp8") and not self.fsdp:   # FSDP2 casts through its MixedPrecisionPolicy
            device_type = self.hooks.autocast_device if self.hooks else self.device.type
            return self._torch.autocast(device_type=device_type, dtype=self._torch.bfloat16)
        return contextlib.nullcontext()

    def compilations(self) -> dict:
        """Graphs torch.compile made so far (a number that stops growing once shapes are static)."""
        if not self.compiled:
            return {}
        from torch._dynamo.utils import counters
        return {"graphs": int(counters["stats"]["unique_graphs"])}

    def _reduced_gradients(self) -> list:
        """The gradients, averaged over the replicas before anything reads them (a norm of one rank's own
        gradients differs from rank to rank): FSDP2 reduced them in its backward; on torch_xla,
        xm.reduce_gradients all-reduces them here (what xm.optimizer_step would do after the clipping).
        Tensor parallelism without FSDP2 leaves the gradients of replicated DTensor parameters (the
        sequence-parallel norms) partial sums over the tensor ranks: they are summed here."""
        if self.hooks is not None and self.hooks.optimizer_step is neuron.OptimizerStep.XM:
            import torch_xla.core.xla_model as xm
            xm.reduce_gradients(self.opt)
        params = list(self.net.parameters())
        for p in params:
            if _is_dtensor(p.grad) and any(placement.is_partial() for placement in p.grad.placements):
                p.grad = p.grad.redistribute(placements=p.placements)
        return [p.grad for p in params]

    def _global_norm(self, grads: list):
        """The L2 norm of every gradient together, a device scalar equal on every rank. Sharded (DTensor)
        gradients add each rank's sum of squares, weighted by 1 / the number of ranks holding the same
        block, in one all-reduce over every rank (their meshes and placements differ: tensor-parallel
        weights, replicated norms, FSDP2-only embeddings). Without a DeviceMesh every rank holds whole,
        already averaged gradients."""
        torch = self._torch
        if self.device_mesh is None:
            return torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            squares += self._local(g).float().pow(2).sum() / _copies(g, self.process_count)
        self._dist.all_reduce(squares)
        return squares.sqrt()

    def _clip(self, grads: list, norm) -> None:
        """Clip as optax.clip_by_global_norm does: g / norm * max_norm when norm exceeds max_norm. The norm
        stays a device tensor (no host read, so no cut in torch_xla's lazy graph); each rank scales its
        own part (an FSDP2 shard, or the whole replicated gradient)."""
        torch = self._torch
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        over = norm > self.optim.max_grad_norm
        one = torch.ones_like(norm)
        torch._foreach_div_(local, torch.where(over, norm, one))
        torch._foreach_mul_(local, torch.where(over, torch.full_like(norm, self.optim.max_grad_norm), one))

    def _to_host(self, *values) -> list[float]:
        """Device scalars as floats, in one transfer. On torch_xla the pending graph (forward, backward,
        gradient reduction, norm, clipping) runs first, as one graph."""
        if self.hooks is not None and self.hooks.step_barrier is neuron.StepBarrier.TORCH_XLA_SYNC:
            import torch_xla
            torch_xla.sync()
        return self._torch.stack([v.float() for v in values]).cpu().tolist()

    def _optimizer_step(self) -> None:
        self._await_snapshot_copy()
        self.opt.step()
        if self.hooks is not None and self.hooks.step_barrier is neuron.StepBarrier.TORCH_XLA_SYNC:
            import torch_xla
            torch_xla.sync()                   # cut the lazy graph here: the optimizer update is one graph

    def describe(self) -> dict:
        torch = self._torch
        devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                   if self.platform == "gpu" else [f"cpu ({torch.get_num_threads()} threads)"])
        return {"framework": "torch", "platform": self.platform, "versions": {"torch": torch.__version__},
                "devices": devices, "device_count": self.process_count, "process_count": self.process_count,
                "device_kind": devices[0] if self.platform == "gpu" else self.platform,
                "precision": self.precision, "mesh": dict(self.mesh_sizes), "mesh_source": self.mesh_source,
                "comm_backend": self.comm_backend if self.distributed else None,
                "neuron_stack": self.hooks.stack if self.hooks else None,
                "bytes_per_device": self.state_bytes()}

    def state_bytes(self) -> dict:
        """Bytes of train state this process holds, measured on its tensors: parameters (the storage of each
        local shard) and AdamW's two moments, float32 and laid out like the parameters (measured where the
        optimizer has made them, else twice the parameters' float32 bytes)."""
        params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                  for p in (self._local(q) for q in self.net.parameters())}
        moments = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for st in self.opt.state.values()
                   for t in (self._local(st["exp_avg"]), self._local(st["exp_avg_sq"]))}
        param_bytes = sum(params.values())
        return {"params": param_bytes, "optimizer": sum(moments.values()) if moments else 2 * param_bytes}

    # -- state ---------------------------------------------------------------------------------
    def _host_tensor(self, full, shared: bool):
        """A host array as a float32 CPU tensor. `shared`: it may share the array's memory (the array is
        the caller's to give away, or the tensor is only read before the call returns); otherwise (and
        where it is not float32, contiguous and writable) it is copied, once."""
        torch = self._torch
        arr = np.asarray(full)
        if arr.dtype == np.float32 and arr.flags.c_contiguous and arr.flags.writeable and shared:
            return torch.from_numpy(arr)
        return torch.from_numpy(np.array(arr, np.float32, copy=True))

    def _to_param_layout(self, p, full: np.ndarray, shared: bool = False):
        """A full host array -> a tensor laid out like parameter p (a DTensor shard under FSDP2). A host
        tensor moved to an accelerator is copied by that move, so only a CPU tensor needs `shared` to
        decide whether it keeps the array's memory."""
        t = self._host_tensor(full, shared or self.device.type != "cpu").to(self.device)
        if _is_dtensor(p):                     # sharded (FSDP2, tensor parallel); else held whole
            from torch.distributed.tensor import distribute_tensor
            t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)  # each rank slices its own
        return t

    def _local(self, t):
        return t.to_local() if hasattr(t, "to_local") else t

    def set_state(self, state: HostState) -> None:
        self._place(state, owned=False)

    def _set_read_state(self, state: HostState) -> None:
        self._place(state, owned=True)

    def _copy_param(self, p, full) -> None:
        """Copy a host array into parameter p. A CPU parameter held whole is filled by NumPy (one memcpy):
        torch's copy_ runs on its OpenMP threads, which on a loaded CPU (JAX's digest threads just ran)
        copied at a few hundred MB/s."""
        if self.device.type == "cpu" and not _is_dtensor(p):
            np.copyto(p.detach().numpy(), np.asarray(full), casting="same_kind")
            return
        self._local(p).copy_(self._local(self._to_param_layout(p, full, shared=True)))

    def _place(self, state: HostState, owned: bool) -> None:
        """Parameters are copied into their tensors straight from the host arrays (one copy); the moments
        become new tensors, which on the CPU keep the arrays' memory where they are `owned` (nobody else
        holds them) and copy them otherwise."""
        torch = self._torch
        mismatch = set(self._names) ^ set(state.params)
        if mismatch:
            raise UserError(f"state does not match the model: parameters {sorted(mismatch)[:3]} differ")
        named = self._resharded()
        self._await_snapshot_copy()
        with torch.no_grad():
            for name, p in named.items():
                self._copy_param(p, state.params[name])
        self.opt.state.clear()
        if state.count > 0:
            for name, p in named.items():
                self.opt.state[p] = {"step": self._step_tensor(state.count),
                                     "exp_avg": self._to_param_layout(p, state.mu[name], shared=owned),
                                     "exp_avg_sq": self._to_param_layout(p, state.nu[name], shared=owned)}

    def _step_tensor(self, count: int):
        """AdamW's step count as torch keeps it: on the device for the fused kernel, on the CPU otherwise."""
        fused = self.opt.param_groups[0].get("fused")
        return self._torch.tensor(float(count), dtype=self._torch.float32, device=self.device if fused else "cpu")

    def _full(self, t) -> np.ndarray:
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        return t.detach().float().cpu().numpy().copy()

    def get_state(self) -> HostState:
        named = self._resharded()
        params, mu, nu, count = {}, {}, {}, 0
        for n, p in named.items():
            params[n] = self._full(p)
            st = self.opt.state.get(p)
            if st:
                mu[n], nu[n], count = self._full(st["exp_avg"]), self._full(st["exp_avg_sq"]), int(st["step"])
            else:
                mu[n], nu[n] = np.zeros_like(params[n]), np.zeros_like(params[n])
        return HostState(params=params, mu=mu, nu=nu, count=count)

    def _resharded(self):
        """FSDP2 may leave the root unsharded after a forward (eval); parameters are DTensors again after this."""
        if self.distributed:
            from torch.distributed.fsdp import FSDPModule
            for m in self.net.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
        return dict(self.net.named_parameters())

    def _count(self) -> int:
        return max([int(st["step"]) for st in self.opt.state.values()] or [0])

    def _sharded_tensors(self) -> dict:
        """{storage name: torch tensor (a DTensor under FSDP2)} of params and moments (no opt/count)."""
        params, mu, nu = {}, {}, {}
        for n, p in self._resharded().items():
            params[n] = p
            st = self.opt.state.get(p)
            mu[n], nu[n] = (st["exp_avg"], st["exp_avg_sq"]) if st else (self._torch.zeros_like(p),) * 2
        return layout.join(params, mu, nu)

    # -- checkpoints: this process's part of the state, written and read through hal.store (orbax) -------------
    _buffer_pool: HostBufferPool | None = None     # host buffers of background saves, made at the first
    _copy_stream = None                            # the CUDA stream their copies run on
    _snapshot_copied = None                        # CUDA event: the last snapshot's copies are done

    def snapshot(self, copy: bool = True) -> Snapshot:
        """This process's part of the state (under FSDP2 each rank's own rows: hal.fsdp_store). copy=True:
        copied now into host buffers that every save reuses (hal.host_buffers), so training may go on while
        another thread runs `write`: on a GPU asynchronously, on a stream of its own (see _copy_to_host);
        on the CPU a memcpy; other devices clone on the device and move the clones in `write`."""
        count = np.asarray(self._count(), layout.COUNT_DTYPE)
        local = {name: (shape, v.detach()) for name, (shape, v) in
                 self._rows.local_parts(self._sharded_tensors()).items()}
        if self.distributed:
            self._rows.start()          # JAX's processes join here, on the training thread
        to_host, release = self._host_copy(local, copy)

        def write(path: str) -> dict:
            try:
                host = to_host()
                if self.distributed:
                    return self._rows.write(path, host, {layout.COUNT: count})
                return store.write_and_describe(path, dict({n: v for n, (_, v) in host.items()},
                                                           **{layout.COUNT: count}))
            finally:
                release()
        return Snapshot(write)

    def _host_copy(self, local: dict, copy: bool):
        """(to_host, release): to_host() returns {name: (shape, float32 host array)} of the snapshot's
        tensors; release() hands the host buffers back once the write has returned."""
        torch = self._torch
        if copy and self.device.type in ("cpu", "cuda"):
            return self._copy_to_host(local)
        if copy:
            local = {n: (shape, v.clone()) for n, (shape, v) in local.items()}

        def to_host():
            with torch.no_grad():
                return {n: (shape, v.float().cpu().numpy()) for n, (shape, v) in local.items()}
        return to_host, lambda: None

    def _copy_to_host(self, local: dict):
        """Copy into pooled host buffers. On a GPU the copies run on a side stream that first waits for
        the work queued on the training stream so far (the state as of this call); they read the live
        tensors, so no device clone is made: the next update of the state (the optimizer step, or a new
        state placed) makes the training stream wait for the copies' event (_await_snapshot_copy), and
        only the writer thread waits on the host. The buffers are pinned, so the copies are asynchronous."""
        torch = self._torch
        cuda = self.device.type == "cuda"
        if self._buffer_pool is None:
            if cuda:
                _register_pinned_memory_in_threads(torch)
            self._buffer_pool = HostBufferPool(
                lambda shape, dtype: torch.empty(shape, dtype=dtype, pin_memory=cuda))
        pool = self._buffer_pool
        buffers = pool.acquire({n: (tuple(v.shape), v.dtype) for n, (_, v) in local.items()})
        copied = None
        with torch.no_grad():
            if cuda:
                if self._copy_stream is None:
                    self._copy_stream = torch.cuda.Stream(self.device)
                side = self._copy_stream
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for n, (_, v) in local.items():
                        v.record_stream(side)     # a temporary (a gathered or zero tensor) lives until copied
                        buffers[n].copy_(v, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(side)
                self._snapshot_copied = copied
            else:
                for n, (_, v) in local.items():      # float32 by NumPy's memcpy (see _copy_param)
                    if v.dtype == torch.float32:
                        np.copyto(buffers[n].numpy(), v.numpy())
                    else:
                        buffers[n].copy_(v)

        def to_host():
            if copied is not None:
                copied.synchronize()            # this thread only
            with torch.no_grad():
                return {n: (shape, _numpy_float32(buffers[n])) for n, (shape, _) in local.items()}
        return to_host, lambda: pool.release(buffers)

    def _await_snapshot_copy(self) -> None:
        """Before the state is written on the device: the training stream waits for the last snapshot's
        copies (an event wait queued on the device; the host goes on)."""
        copied, self._snapshot_copied = self._snapshot_copied, None
        if copied is not None:
            self._torch.cuda.current_stream(self.device).wait_event(copied)

    def load(self, path: str, manifest_tensors: dict, name=None) -> dict:
        """Under FSDP2 every rank reads only its own rows (hal.fsdp_store); checked like Backend.load."""
        if not self.distributed:
            return super().load(path, manifest_tensors, name)
        name = self._check_model_tensors(path, manifest_tensors, name)
        shapes = {k: tuple(t.shape) for k, t in self._sharded_tensors().items()}
        shapes[layout.COUNT] = ()
        local, found = self._rows.read(path, shapes, name, self.allreduce)
        layout.verify(manifest_tensors, found, name)
        self._set_local_rows(local)
        return found

    def _set_local_rows(self, local: dict) -> None:
        """Params and moments from {storage name: this rank's rows, or the whole tensor where it is
        replicated} (NumPy), as hal.fsdp_store reads them."""
        torch = self._torch
        count = int(local[layout.COUNT])
        named = self._resharded()
        self._await_snapshot_copy()
        self.opt.state.clear()
        with torch.no_grad():
            for n, p in named.items():
                vals = {}
                for key in (layout.param_key(n), layout.mu_key(n), layout.nu_key(n)):
                    rows = local[key]
                    if not self._rows.sharded(key, tuple(p.shape)):      # read whole: take this rank's part
                        rows = self._local(self._to_param_layout(p, rows)).cpu().numpy()
                    vals[key] = torch.from_numpy(np.array(rows, np.float32)).to(self.device)
                self._local(p).copy_(vals[layout.param_key(n)])
                if count > 0:
                    mu, nu = torch.zeros_like(p), torch.zeros_like(p)
                    self._local(mu).copy_(vals[layout.mu_key(n)])
                    self._local(nu).copy_(vals[layout.nu_key(n)])
                    self.opt.state[p] = {"step": self._step_tensor(count), "exp_avg": mu, "exp_avg_sq": nu}

    def allreduce(self, values: np.ndarray) -> np.ndarray:
        return distributed.sum_over_ranks(values) if self.distributed else values

    def barrier(self, name: str) -> None:
        if self.distributed:
            distributed.host_barrier()

    # -- compute -------------------------------------------------------------------------------
    def batch_rows(self, micro_batch: int) -> slice:
        """Rank r of a (data, fsdp, tensor) mesh reads the rows of batch group r // tensor."""
        per = micro_batch // self._batch_groups()
        group = self.process_index // self.mesh_sizes["tensor"]
        return slice(group * per, (group + 1) * per)

    def _mine(self, tokens: np.ndarray):
        """This rank's rows of each micro-batch (given whole, or only this rank's rows), as a long tensor on
        the device."""
        t = np.asarray(tokens, np.int64)
        if self.distributed and t.shape[1] == (self._micro_batch or t.shape[1]):
            t = t[:, self.batch_rows(t.shape[1])]
        return self._torch.from_numpy(np.ascontiguousarray(t)).to(self.device)

    def _mean_over_ranks(self, x):
        if self.distributed:
            self._dist.all_reduce(x, op=self._dist.ReduceOp.AVG if self.platform == "gpu" else self._dist.ReduceOp.SUM)
            if self.platform != "gpu":    # gloo has no AVG
                x /= self.process_count
        return x

    def _loss(self, tokens):
        """The mean loss of one micro-batch, as a DTensor where the logits are vocabulary-parallel (their
        backward must run inside self._loss_context() too)."""
        t = self.mesh_sizes["tensor"]
        if t > 1 and (tokens.shape[1] - 1) % t:
            raise UserError(f"trainer.seq_len ({tokens.shape[1] - 1}) must be a multiple of hal.mesh.tensor ({t}): "
                            f"the sequence is split over the tensor ranks between the blocks")
        with self._autocast():
            if self.net.loss_chunk:          # the loss inside the root's forward (FSDP2's unsharded weights)
                return self.net(tokens[:, :-1], tokens[:, 1:])
            logits = self.net(tokens[:, :-1])
        return self._cross_entropy(logits, tokens[:, 1:])

    def _loss_context(self):
        return torch_parallel.loss_context(self._vocab_parallel)

    def train_step(self, tokens: np.ndarray, lr: float) -> StepMetrics:
        torch = self._torch
        self.net.train()
        batch = self._mine(tokens)
        accum = batch.shape[0]
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        saved = {}
        for i, micro in enumerate(batch):
            with self._loss_context():
                with self._saved_bytes(saved) if i == 0 and not self._bytes_logged else contextlib.nullcontext():
                    loss = self._loss(micro)
                (loss / accum).backward()    # FSDP2 averages gradients over ranks in its reduce-scatter
            total += self._local(loss.detach())
        grads = self._reduced_gradients()
        grad_norm = self._global_norm(grads)
        self._clip(grads, grad_norm)
        loss, norm = self._to_host(self._mean_over_ranks(total / accum), grad_norm)
        # A non-finite loss or gradient never reaches the state: the update (and its count) is skipped.
        skipped = not (np.isfinite(loss) and np.isfinite(norm))
        if not skipped:
            for group in self.opt.param_groups:
                group["lr"] = lr
            self._optimizer_step()
        if not self._bytes_logged:
            self._bytes_logged = True
            log.info("process %d holds %s (activations: what autograd saved for the backward pass of one "
                     "micro-batch of %d rows)", self.process_index,
                     _bytes_line(dict(self.state_bytes(), activations=sum(saved.values()))), batch.shape[1])
        return StepMetrics(loss=loss, grad_norm=norm, skipped=skipped)

    def _saved_bytes(self, into: dict):
        """A context in which autograd's saved tensors are counted into {storage: bytes} (this process's part
        of each, each storage once); parameters, saved as themselves, are not activations."""
        from torch.distributed._functional_collectives import AsyncCollectiveTensor

        def pack(t):
            local = t._local_tensor if _is_dtensor(t) else t
            if isinstance(local, AsyncCollectiveTensor):      # a collective's result, not waited for yet
                local = local.elem
            if not (t.is_leaf and t.requires_grad) and local.device.type != "meta":
                into[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
            return t
        return self._torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def eval_loss(self, tokens: np.ndarray) -> float:
        torch = self._torch
        self.net.eval()
        with torch.no_grad(), self._loss_context():
            batch = self._mine(tokens)
            losses = torch.stack([self._local(self._loss(micro)) for micro in batch])
            return float(self._mean_over_ranks(losses.mean()))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        torch = self._torch
        self.net.eval()
        with torch.no_grad(), self._autocast():
            out = self.net(torch.from_numpy(np.asarray(tokens, np.int64)).to(self.device))
        return self._full(out)
