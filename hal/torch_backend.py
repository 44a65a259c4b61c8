"""PyTorch backend: the same Llama in torch, torch.optim.AdamW with two param groups, and FSDP2
(`fully_shard` per transformer block and at the root) over a DeviceMesh when launched by torchrun
(GPU: nccl, CPU: gloo). Hybrid sharding (replicate x shard) when the mesh has data > 1."""
from __future__ import annotations

import contextlib
import os

import numpy as np

from hal import mesh as meshlib
from hal import neuron, store
from hal.base import Backend, HostState, OptimizerSpec, StepMetrics, UserError
from models.spec import LlamaConfig, decays

COMM_BACKEND = {"cpu": "gloo", "gpu": "nccl"}


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


def _free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class TorchBackend(Backend):
    framework = "torch"

    def __init__(self, model: LlamaConfig, optim: OptimizerSpec, precision: str = "fp32",
                 platform: str = "auto", remat: bool = False, mesh: dict | None = None,
                 mesh_rule: str = "auto", instance_type: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor", neuron_cfg: dict | None = None):
        super().__init__(model, optim, precision)
        import torch
        import torch.distributed as dist
        from models.llama_torch import LlamaForCausalLM, cross_entropy

        self._torch, self._dist = torch, dist
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.hooks = None
        if platform == "neuron":
            neuron_cfg = neuron_cfg or {}
            stack = neuron.select_stack("torch", neuron.NeuronProbe.detect())
            self.hooks = neuron.hooks_for(stack, precision, neuron_cfg.get("cache_dir"),
                                          neuron_cfg.get("stochastic_rounding", True), instance_type)
            neuron.apply_env(self.hooks, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), instance_type)
            COMM_BACKEND["neuron"] = self.hooks.process_group_backend
            compile_backend = self.hooks.compile_backend or compile_backend
        self.platform, self.device = _select_device(platform, local_rank, self.hooks)
        if self.platform == "gpu":
            # checkpoints go through orbax, i.e. JAX (on the host CPU here): a CUDA JAX in this process must
            # not take the GPU's memory up front as it does by default (before JAX starts: no effect after)
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        # On CPUs torch's OpenMP threads spin-wait; a background checkpoint write beside them slowed the next
        # step by ~1 step (bench/run.py table 4c) where a blocking save takes ~1/3 of one: block there.
        # Neuron (torch-xla / TorchNeuron) is left blocking too: a second thread beside its graphs is untested.
        self.async_save_default = self.platform == "gpu"
        self.distributed = world > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(COMM_BACKEND[self.platform])
        self.process_index, self.process_count = (dist.get_rank(), world) if self.distributed else (0, 1)
        self.mesh_sizes, self.mesh_source = meshlib.choose(mesh, mesh_rule, meshlib.instance_type(instance_type),
                                                           world)
        if self.mesh_sizes["tensor"] != 1:
            if mesh:   # asked for explicitly
                raise UserError(f"hal=torch shards with FSDP2 over (data, fsdp); tensor parallelism is JAX-only for "
                                f"now: set hal.mesh.tensor=1 (mesh {self.mesh_sizes})")
            # a platform rule's tensor axis (e.g. Trainium's TP inside a chip): FSDP over those cores instead
            self.mesh_sizes = dict(self.mesh_sizes, fsdp=self.mesh_sizes["fsdp"] * self.mesh_sizes["tensor"], tensor=1)
            self.mesh_source += " (tensor axis folded into fsdp: torch has no tensor parallelism yet)"

        with torch.device("meta"):
            net = LlamaForCausalLM(model)
        net.activation_checkpointing = remat
        self.device_mesh = None
        if compile:   # per block, as torchtitan does: one graph reused by every block
            for layer in net.model.layers:
                layer.compile(backend=compile_backend)
        self.compiled = compile
        if self.distributed and (self.hooks is None or self.hooks.supports_fsdp2):
            net = self._fully_shard(net)
        self.net = net.to_empty(device=self.device)
        self._cross_entropy = cross_entropy
        named = dict(self.net.named_parameters())
        decay = [p for n, p in named.items() if decays(n, tuple(p.shape))]
        no_decay = [p for n, p in named.items() if not decays(n, tuple(p.shape))]
        # lr is set before every step from the trainer's schedule; 0.0 here is never used. The fused
        # kernel (CPU and CUDA) updates all tensors in one pass: 65 -> 17 ms a step on `small` here.
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.0, betas=(optim.b1, optim.b2), eps=optim.eps, **fused)
        self._names = list(named)

    def _fully_shard(self, net):
        """FSDP2: one unit per decoder block, the root (embeddings, final norm, head) last."""
        torch = self._torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        d, f = self.mesh_sizes["data"], self.mesh_sizes["fsdp"]
        device_type = self.device.type
        if d > 1:   # hybrid: replicate over data, shard over fsdp
            self.device_mesh = init_device_mesh(device_type, (d, f), mesh_dim_names=("data", "fsdp"))
        else:
            self.device_mesh = init_device_mesh(device_type, (f,), mesh_dim_names=("fsdp",))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision == "bf16" else MixedPrecisionPolicy()
        for layer in net.model.layers:
            fully_shard(layer, mesh=self.device_mesh, mp_policy=mp)
        fully_shard(net, mesh=self.device_mesh, mp_policy=mp)
        return net

    def check_batch(self, micro_batch: int) -> None:
        if micro_batch % self.process_count:
            raise UserError(f"trainer.micro_batch ({micro_batch}) must be a multiple of the number of processes "
                            f"({self.process_count})")

    def _autocast(self):
        if self.precision == "bf16" and not self.device_mesh:   # FSDP2 casts through its MixedPrecisionPolicy
            device_type = self.hooks.autocast_device if self.hooks else self.device.type
            return self._torch.autocast(device_type=device_type, dtype=self._torch.bfloat16)
        return contextlib.nullcontext()

    def compilations(self) -> dict:
        """Graphs torch.compile made so far (a number that stops growing once shapes are static)."""
        if not self.compiled:
            return {}
        from torch._dynamo.utils import counters
        return {"graphs": int(counters["stats"]["unique_graphs"])}

    def _optimizer_step(self) -> None:
        if self.hooks is not None and self.hooks.optimizer_step == "xm.optimizer_step":
            import torch_xla.core.xla_model as xm
            xm.optimizer_step(self.opt)        # all-reduces gradients over the replicas, then steps
        else:
            self.opt.step()
        if self.hooks is not None and self.hooks.step_barrier == "torch_xla.sync":
            import torch_xla
            torch_xla.sync()                   # cut the lazy graph here: one compiled step per step

    def describe(self) -> dict:
        torch = self._torch
        devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                   if self.platform == "gpu" else [f"cpu ({torch.get_num_threads()} threads)"])
        return {"framework": "torch", "platform": self.platform, "versions": {"torch": torch.__version__},
                "devices": devices, "device_count": self.process_count, "process_count": self.process_count,
                "device_kind": devices[0] if self.platform == "gpu" else self.platform,
                "precision": self.precision, "mesh": dict(self.mesh_sizes), "mesh_source": self.mesh_source,
                "comm_backend": COMM_BACKEND[self.platform] if self.distributed else None,
                "neuron_stack": self.hooks.stack if self.hooks else None}

    # -- state ---------------------------------------------------------------------------------
    def _to_param_layout(self, p, full: np.ndarray):
        """A full host array -> a tensor laid out like parameter p (a DTensor shard under FSDP2)."""
        torch = self._torch
        t = torch.from_numpy(np.array(full, np.float32, copy=True)).to(self.device)
        if self.distributed:
            from torch.distributed.tensor import distribute_tensor
            t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)  # each rank slices its own
        return t

    def _local(self, t):
        return t.to_local() if hasattr(t, "to_local") else t

    def set_state(self, state: HostState) -> None:
        torch = self._torch
        mismatch = set(self._names) ^ set(state.params)
        if mismatch:
            raise UserError(f"state does not match the model: parameters {sorted(mismatch)[:3]} differ")
        named = self._resharded()
        with torch.no_grad():
            for name, p in named.items():
                self._local(p).copy_(self._local(self._to_param_layout(p, state.params[name])))
        self.opt.state.clear()
        if state.count > 0:
            for name, p in named.items():
                self.opt.state[p] = {"step": self._step_tensor(state.count),
                                     "exp_avg": self._to_param_layout(p, state.mu[name]),
                                     "exp_avg_sq": self._to_param_layout(p, state.nu[name])}

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

    # Under FSDP2 checkpoints go through orbax as global jax.Arrays built from each rank's shard (jax on
    # the CPU, jax.distributed over the same ranks): every rank writes and reads only its own rows.
    def _jax_io(self):
        if not hasattr(self, "_jax_mesh"):
            import jax
            jax.config.update("jax_platforms", "cpu")
            from hal.jax_backend import maybe_initialize_distributed
            port = None
            if self.distributed and not jax.distributed.is_initialized():
                # rank 0 picks a free port for JAX's coordinator and tells the others over torch's group
                # (MASTER_PORT + 1, JAX's default under torchrun, may be taken by anything on the host)
                box = [_free_port() if self.process_index == 0 else None]
                self._dist.broadcast_object_list(box, src=0)
                port = box[0]
            maybe_initialize_distributed("auto", coordinator_port=port)
            from jax.sharding import Mesh
            devices = sorted(jax.devices(), key=lambda dev: dev.process_index)
            self._jax_mesh = Mesh(np.array(devices).reshape(self.mesh_sizes["data"], self.mesh_sizes["fsdp"]),
                                  ("data", "fsdp"))
        return self._jax_mesh

    def _row_sharded(self, shape) -> bool:
        return len(shape) > 0 and shape[0] % self.mesh_sizes["fsdp"] == 0

    def _jax_sharding(self, shape):
        from jax.sharding import NamedSharding, PartitionSpec as P
        return NamedSharding(self._jax_io(), P("fsdp") if self._row_sharded(shape) else P())

    def _resharded(self):
        """FSDP2 may leave the root unsharded after a forward (eval); parameters are DTensors again after this."""
        if self.distributed:
            from torch.distributed.fsdp import FSDPModule
            for m in self.net.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
        return dict(self.net.named_parameters())

    def _sharded_tensors(self) -> dict:
        """{storage name: torch tensor (DTensor under FSDP2)}."""
        out = {}
        for n, p in self._resharded().items():
            out[f"params/{n}"] = p
            st = self.opt.state.get(p)
            if st:
                out[f"opt/mu/{n}"], out[f"opt/nu/{n}"] = st["exp_avg"], st["exp_avg_sq"]
            else:
                out[f"opt/mu/{n}"] = out[f"opt/nu/{n}"] = self._torch.zeros_like(p)
        return out

    def snapshot(self, copy: bool = True):
        """This process's part of the state, cloned where it lives (device memory on a GPU; a memcpy on the
        CPU) so training may go on; `write` moves it to the host and writes it. Under FSDP2 every rank
        writes only its own rows, through orbax as global jax.Arrays on a CPU mesh over the same ranks."""
        torch = self._torch
        count = max([int(st["step"]) for st in self.opt.state.values()] or [0])
        local = {}
        for name, t in self._sharded_tensors().items():
            # a dim 0 FSDP2 cannot split evenly: gathered now (a collective: this thread, not `write`)
            v = self._local(t) if (not self.distributed or self._row_sharded(tuple(t.shape))) else t.full_tensor()
            local[name] = (tuple(t.shape), v.detach().clone() if copy else v.detach())
        if self.distributed:
            self._jax_io()          # jax.distributed is started here, on the training thread
        side = None
        if copy and self.device.type == "cuda":
            # The copies to the host go on a stream of their own: on the training stream they queued behind
            # (and held up) the next step — 12 s for the 1B state on an H200 (bench/RESULTS_H200.md).
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))      # after the clones above

        def to_host():
            if side is None:
                return {n: (shape, v.float().cpu().numpy()) for n, (shape, v) in local.items()}
            with torch.cuda.stream(side):
                pinned = {n: (shape, v.to("cpu", non_blocking=True)) for n, (shape, v) in local.items()}
            side.synchronize()
            return {n: (shape, v.float().numpy()) for n, (shape, v) in pinned.items()}

        def write(path: str) -> dict:
            with torch.no_grad():
                host = to_host()
            if self.distributed:
                import jax
                dev = jax.local_devices()[0]
                tensors = {n: jax.make_array_from_single_device_arrays(shape, self._jax_sharding(shape),
                                                                      [jax.device_put(v, dev)])
                           for n, (shape, v) in host.items()}
            else:
                tensors = {n: v for n, (shape, v) in host.items()}
            tensors["opt/count"] = np.asarray(count, np.int32)
            return store.write_and_describe(path, tensors, self.process_index)
        return write

    def load(self, path: str, manifest_tensors: dict) -> dict:
        if not self.distributed:
            return super().load(path, manifest_tensors)
        torch = self._torch
        targets = self._sharded_tensors()
        missing = sorted(set(targets) - set(manifest_tensors))
        if missing:
            raise UserError(f"checkpoint {path} lacks tensors this model needs, e.g. {missing[:2]}")
        shardings = {k: self._jax_sharding(tuple(t.shape)) for k, t in targets.items()}
        shardings["opt/count"] = self._jax_sharding(())
        read = store.read_tensors(path, list(shardings), shardings=shardings)
        found = store.digests(read, self.allreduce)
        count = int(np.asarray(read.pop("opt/count").addressable_shards[0].data))
        named = self._resharded()
        self.opt.state.clear()
        with torch.no_grad():
            for n, p in named.items():
                vals = {}
                for key in (f"params/{n}", f"opt/mu/{n}", f"opt/nu/{n}"):
                    arr = read[key]
                    local = np.asarray(arr.addressable_shards[0].data)
                    if not self._row_sharded(arr.shape):       # replicated on read: take this rank's rows
                        local = self._local(self._to_param_layout(p, local)).cpu().numpy()
                    vals[key] = torch.from_numpy(np.array(local, np.float32)).to(self.device)
                self._local(p).copy_(vals[f"params/{n}"])
                if count > 0:
                    mu, nu = torch.zeros_like(p), torch.zeros_like(p)
                    self._local(mu).copy_(vals[f"opt/mu/{n}"])
                    self._local(nu).copy_(vals[f"opt/nu/{n}"])
                    self.opt.state[p] = {"step": self._step_tensor(count), "exp_avg": mu, "exp_avg_sq": nu}
        return found

    def allreduce(self, values: np.ndarray) -> np.ndarray:
        if not self.distributed:
            return values
        torch = self._torch
        halves = torch.from_numpy(np.ascontiguousarray(values, np.uint64).view(np.uint32).astype(np.int64))
        parts = [torch.zeros_like(halves) for _ in range(self.process_count)]
        self._dist.all_gather(parts, halves)
        stacked = np.stack([p.numpy().astype(np.uint32) for p in parts])
        return stacked.view(np.uint64).sum(axis=0, dtype=np.uint64)

    def barrier(self, name: str) -> None:
        if self.distributed:
            self._dist.barrier()

    # -- compute -------------------------------------------------------------------------------
    def _mine(self, tokens: np.ndarray):
        """This rank's rows of each micro-batch, as a long tensor on the device."""
        t = np.asarray(tokens, np.int64)
        if self.distributed:
            per = t.shape[1] // self.process_count
            t = t[:, self.process_index * per:(self.process_index + 1) * per]
        return self._torch.from_numpy(np.ascontiguousarray(t)).to(self.device)

    def _mean_over_ranks(self, x):
        if self.distributed:
            self._dist.all_reduce(x, op=self._dist.ReduceOp.AVG if self.platform == "gpu" else self._dist.ReduceOp.SUM)
            if self.platform != "gpu":    # gloo has no AVG
                x /= self.process_count
        return x

    def _loss(self, tokens):
        with self._autocast():
            logits = self.net(tokens[:, :-1])
        return self._cross_entropy(logits, tokens[:, 1:])

    def train_step(self, tokens: np.ndarray, lr: float) -> StepMetrics:
        torch = self._torch
        self.net.train()
        batch = self._mine(tokens)
        accum = batch.shape[0]
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in batch:
            loss = self._loss(micro)
            (loss / accum).backward()        # FSDP2 averages gradients over ranks in its reduce-scatter
            total += loss.detach()
        grads = [p.grad for p in self.net.parameters()]
        grad_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss = float(self._mean_over_ranks(total / accum))
        norm = float(grad_norm)
        # A non-finite loss or gradient never reaches the state: the update (and its count) is skipped.
        skipped = not (np.isfinite(loss) and np.isfinite(norm))
        if not skipped:
            # Clip as optax.clip_by_global_norm does: g / norm * max_norm when norm exceeds max_norm.
            if norm > self.optim.max_grad_norm:
                torch._foreach_div_(grads, norm)
                torch._foreach_mul_(grads, self.optim.max_grad_norm)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self._optimizer_step()
        return StepMetrics(loss=loss, grad_norm=norm, skipped=skipped)

    def eval_loss(self, tokens: np.ndarray) -> float:
        torch = self._torch
        self.net.eval()
        with torch.no_grad():
            batch = self._mine(tokens)
            return float(self._mean_over_ranks(torch.stack([self._loss(micro) for micro in batch]).mean()))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        torch = self._torch
        self.net.eval()
        with torch.no_grad(), self._autocast():
            out = self.net(torch.from_numpy(np.asarray(tokens, np.int64)).to(self.device))
        return out.float().cpu().numpy()
