"""JAX backend: Flax model, Optax AdamW, one jax.jit'ed train step over a device Mesh (TPU, GPU,
Neuron PJRT plugin, CPU host devices), NamedSharding through logical axis rules, multi-host through
jax.distributed."""
from __future__ import annotations

import functools
import os

import numpy as np

from hal import mesh as meshlib
from hal import neuron, store
from hal.base import Backend, HostState, OptimizerSpec, StepMetrics, UserError
from models.spec import LlamaConfig, flatten, logical_axes, nest, param_shapes

# jax.default_backend() names -> trichip platform names
_PLATFORM_OF = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu", "neuron": "neuron"}


def _select_platform(platform: str) -> str:
    """Pin JAX to the asked platform (one try: after a failed backend start JAX cannot try another)."""
    import jax
    if platform != "auto":
        # gpu: let JAX pick among its installed GPU plugins (CUDA or ROCm), then check it found one
        name = {"gpu": "", "cpu": "cpu", "tpu": "tpu", "neuron": "neuron"}.get(platform)
        if name is None:
            raise UserError(f"hal.platform={platform!r} is not one of auto, cpu, gpu, tpu, neuron")
        try:
            if name:
                jax.config.update("jax_platforms", name)
            found = _PLATFORM_OF.get(jax.default_backend(), jax.default_backend())
        except RuntimeError as e:
            raise UserError(f"hal.platform={platform} but JAX cannot start it ({str(e).splitlines()[0]}); "
                            f"install the matching jax plugin or use hal.platform=auto") from None
        if found != platform:
            raise UserError(f"hal.platform={platform} but JAX found only {found} devices; install the matching "
                            f"jax plugin (e.g. pip install 'jax[cuda12]') or use hal.platform=auto")
    return _PLATFORM_OF.get(jax.default_backend(), jax.default_backend())


def _attention_impl(asked: str, platform: str, precision: str) -> str:
    """hal.attention: auto = cuDNN flash attention on GPUs in bf16 (it takes no fp32), XLA's elsewhere."""
    if asked == "auto":
        return "cudnn" if platform == "gpu" and precision == "bf16" else "xla"
    if asked not in ("xla", "cudnn"):
        raise UserError(f"hal.attention={asked!r} is not one of auto, xla, cudnn")
    if asked == "cudnn" and (platform != "gpu" or precision != "bf16"):
        raise UserError(f"hal.attention=cudnn needs hal.platform=gpu and trainer.precision=bf16 "
                        f"(here: {platform}, {precision}); use hal.attention=auto")
    return asked


def maybe_initialize_distributed(mode, coordinator_port: int | None = None) -> None:
    """jax.distributed.initialize() for multi-host runs.

    mode auto: initialize when launched as several processes — by torchrun-style variables
    (WORLD_SIZE > 1; the JAX coordinator listens on MASTER_PORT + 1, since torchrun's own store holds
    MASTER_PORT) or by a cluster JAX detects itself (TPU pods, SLURM). true: always; false: never.
    """
    import jax
    if mode is False or mode == "false" or jax.distributed.is_initialized():
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu") or jax.config.jax_platforms == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        port = coordinator_port or int(os.environ.get("MASTER_PORT", "29500")) + 1
        addr = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{port}"
        jax.distributed.initialize(coordinator_address=addr, num_processes=world,
                                   process_id=int(os.environ["RANK"]))
    elif mode is True or mode == "true":
        jax.distributed.initialize()


class JaxBackend(Backend):
    framework = "jax"

    def __init__(self, model: LlamaConfig, optim: OptimizerSpec, precision: str = "fp32",
                 platform: str = "auto", remat: bool = False, mesh: dict | None = None,
                 mesh_rule: str = "auto", instance_type: str | None = None, distributed="auto",
                 compile_cache_dir: str | None = None, neuron_cfg: dict | None = None, attention: str = "auto"):
        super().__init__(model, optim, precision)
        self.hooks = None
        if platform == "neuron":   # never run on Trainium hardware here: see hal/neuron.py
            neuron_cfg = neuron_cfg or {}
            self.hooks = neuron.hooks_for(neuron.select_stack("jax", neuron.NeuronProbe.detect()), precision,
                                          neuron_cfg.get("cache_dir"), neuron_cfg.get("stochastic_rounding", True),
                                          instance_type)
            neuron.apply_env(self.hooks, int(os.environ.get("LOCAL_RANK", "0")),
                             int(os.environ.get("LOCAL_WORLD_SIZE", "1")), instance_type)
        import jax
        import jax.numpy as jnp
        import optax
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        from models.llama_jax import LlamaForCausalLM, cross_entropy

        maybe_initialize_distributed(distributed)
        self.platform = _select_platform(platform)
        self._jax = jax
        if precision == "fp32":   # GPUs default to TF32-class matmuls; fp32 means fp32 (parity with torch)
            jax.config.update("jax_default_matmul_precision", "highest")
        if compile_cache_dir:   # persistent XLA compile cache: a restart (or a precompile run) fills it
            jax.config.update("jax_compilation_cache_dir", str(compile_cache_dir))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        n = jax.device_count()
        self.mesh_sizes, self.mesh_source = meshlib.choose(mesh, mesh_rule, meshlib.instance_type(instance_type), n)
        self.mesh = jax.make_mesh(tuple(self.mesh_sizes[a] for a in meshlib.AXES), meshlib.AXES,
                                  axis_types=(AxisType.Auto,) * len(meshlib.AXES))
        self.process_index, self.process_count = jax.process_index(), jax.process_count()

        shapes = param_shapes(model)
        specs = {k: P(*meshlib.partition(logical_axes(k, s), s, self.mesh_sizes)) for k, s in shapes.items()}
        self.param_shardings = {k: NamedSharding(self.mesh, spec) for k, spec in specs.items()}
        self.replicated = NamedSharding(self.mesh, P())
        batch_axes = meshlib.partition(("batch",), (self._batch_divisor(),), self.mesh_sizes)[0]
        self.batch_sharding = NamedSharding(self.mesh, P(None, batch_axes, None))

        dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
        self.attention = _attention_impl(attention, self.platform, precision)
        self.net = LlamaForCausalLM(model, dtype=dtype, remat=remat,
                                    attention=None if self.attention == "xla" else self.attention)
        self._mask = nest({k: len(s) == 2 for k, s in shapes.items()})
        self.tx = optax.chain(
            optax.clip_by_global_norm(optim.max_grad_norm),
            optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
            optax.add_decayed_weights(optim.weight_decay, mask=self._mask),
        )
        net, tx = self.net, self.tx
        p_sh = nest(self.param_shardings)
        opt_sh = self._opt_shardings(p_sh)

        def loss_fn(params, tokens):
            logits = net.apply({"params": params}, tokens[:, :-1])
            return cross_entropy(logits, tokens[:, 1:])

        def train_step(params, opt_state, tokens, lr):
            grad_fn = jax.value_and_grad(loss_fn)
            if tokens.shape[0] == 1:
                loss, grads = grad_fn(params, tokens[0])
            else:
                def micro(acc, tok):
                    loss, grads = grad_fn(params, tok)
                    return jax.tree.map(jnp.add, acc, (loss, grads)), None
                zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
                (loss, grads), _ = jax.lax.scan(micro, zero, tokens)
                loss, grads = jax.tree.map(lambda x: x / tokens.shape[0], (loss, grads))
            grad_norm = optax.tree.norm(grads)

            def update(operand):
                params, opt_state, grads = operand
                updates, new_opt_state = tx.update(grads, opt_state, params)
                return jax.tree.map(lambda p, u: p - lr * u, params, updates), new_opt_state

            # A non-finite loss or gradient never reaches the state: the update (and count) is skipped. A cond,
            # not a select of old against new: that select was one more pass over params and both moments, 3%
            # of a CPU step of the small model (bench/RESULTS.md, session 4).
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new_params, new_opt_state = jax.lax.cond(finite, update, lambda operand: operand[:2],
                                                     (params, opt_state, grads))
            return new_params, new_opt_state, loss, grad_norm

        def eval_loss(params, tokens):
            return jax.lax.map(lambda tok: loss_fn(params, tok), tokens).mean()

        rep = self.replicated
        self._train_step = jax.jit(train_step, donate_argnums=(0, 1),
                                   in_shardings=(p_sh, opt_sh, self.batch_sharding, rep),
                                   out_shardings=(p_sh, opt_sh, rep, rep))
        self._eval_loss = jax.jit(eval_loss, in_shardings=(p_sh, self.batch_sharding), out_shardings=rep)
        # a real copy (jit forwards an input returned unchanged; jnp.copy makes a new buffer)
        self._copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
        self._copy_warm = False
        self._logits = jax.jit(lambda params, tokens: net.apply({"params": params}, tokens),
                               in_shardings=(p_sh, rep), out_shardings=rep)
        self.params = self.opt_state = None

    def _batch_divisor(self) -> int:
        return self.mesh_sizes["data"] * self.mesh_sizes["fsdp"]

    def check_batch(self, micro_batch: int) -> None:
        d = self._batch_divisor()
        if micro_batch % d:
            raise UserError(f"trainer.micro_batch ({micro_batch}) must be a multiple of the mesh's data x fsdp "
                            f"size ({d}, mesh {self.mesh_sizes}); change the batch or hal.mesh")

    def _opt_shardings(self, p_sh):
        """Optax state shardings: moments like the params, the step count replicated."""
        jax = self._jax
        abstract = jax.eval_shape(self.tx.init, nest(
            {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in param_shapes(self.model).items()}))
        adam = abstract[1]
        return (abstract[0], adam._replace(count=self.replicated, mu=p_sh, nu=p_sh), abstract[2])

    def compilations(self) -> dict:
        """How many times each jitted function compiled (one shape each: 1 and 1)."""
        return {"train_step": self._train_step._cache_size(), "eval": self._eval_loss._cache_size()}

    def describe(self) -> dict:
        jax = self._jax
        import flax
        import optax
        return {"framework": "jax", "platform": self.platform,
                "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
                "devices": [str(d) for d in jax.devices()[:8]], "device_count": jax.device_count(),
                "device_kind": jax.devices()[0].device_kind,
                "process_count": self.process_count, "precision": self.precision, "attention": self.attention,
                "mesh": dict(self.mesh_sizes), "mesh_source": self.mesh_source}

    # -- state ---------------------------------------------------------------------------------
    def _put(self, array, sharding):
        """A host array (the same on every process) -> a global jax.Array; each process places its shards."""
        array = np.asarray(array)
        return self._jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])

    def _shardings(self) -> dict:
        sh = {f"params/{k}": s for k, s in self.param_shardings.items()}
        sh.update({f"opt/mu/{k}": s for k, s in self.param_shardings.items()})
        sh.update({f"opt/nu/{k}": s for k, s in self.param_shardings.items()})
        sh["opt/count"] = self.replicated
        return sh

    def _set_tensors(self, t: dict) -> None:
        group = lambda prefix: nest({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})  # noqa: E731
        self.params = group("params/")
        init = self._jax.eval_shape(self.tx.init, self.params)
        adam = init[1]._replace(count=t["opt/count"], mu=group("opt/mu/"), nu=group("opt/nu/"))
        self.opt_state = (init[0], adam, init[2])

    def set_state(self, state: HostState) -> None:
        t = state.tensors()
        sh = self._shardings()
        self._set_tensors({k: self._put(v, sh[k]) for k, v in t.items()})
        self._warm_copy()

    def _warm_copy(self) -> None:
        """Compile the snapshot copy now: compiled at the first async save it blocked that save ~0.25 s."""
        if not self._copy_warm:
            self._copy.lower(self._tensors()).compile()
            self._copy_warm = True

    def _tensors(self) -> dict:
        adam = self.opt_state[1]
        t = {f"params/{k}": v for k, v in flatten(self.params).items()}
        t.update({f"opt/mu/{k}": v for k, v in flatten(adam.mu).items()})
        t.update({f"opt/nu/{k}": v for k, v in flatten(adam.nu).items()})
        t["opt/count"] = adam.count
        return t

    def get_state(self) -> HostState:
        from jax.experimental import multihost_utils
        t = self._tensors()
        if self.process_count > 1:
            t = multihost_utils.process_allgather(t, tiled=True)
        return HostState.from_tensors({k: np.asarray(self._jax.device_get(v)) for k, v in t.items()})

    def snapshot(self, copy: bool = True):
        """Each process writes the shards it holds (no gather). copy=True: a copy on the device, dispatched
        before the next step can donate the state's buffers (blocks only as long as that copy takes)."""
        t = self._tensors()
        if copy:
            t = self._copy(t)

        def write(path: str) -> dict:
            return store.write_and_describe(path, t, self.process_index)
        write.tensors = t          # what the write holds (the copies): callers may wait on them
        return write

    def load(self, path: str, manifest_tensors: dict) -> dict:
        """Restore straight into this mesh's shardings (any writer, any device count)."""
        sh = self._shardings()
        missing = sorted(set(sh) - set(manifest_tensors))
        if missing:
            raise UserError(f"checkpoint {path} lacks tensors this model needs, e.g. {missing[:2]}")
        t = store.read_tensors(path, list(sh), shardings=sh)
        found = store.digests(t, self.allreduce if self.process_count > 1 else None)
        self._set_tensors(t)
        return found

    def allreduce(self, values: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils
        # as uint32 pairs: without jax_enable_x64 a 64-bit integer array would be cut to 32 bits
        halves = np.ascontiguousarray(values, np.uint64).view(np.uint32)
        gathered = np.asarray(multihost_utils.process_allgather(halves), np.uint32)
        return gathered.reshape(self.process_count, -1).view(np.uint64).sum(axis=0, dtype=np.uint64)

    def barrier(self, name: str) -> None:
        if self.process_count > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(name)

    # -- compute -------------------------------------------------------------------------------
    def train_step(self, tokens: np.ndarray, lr: float) -> StepMetrics:
        batch = self._put(np.asarray(tokens, np.int32), self.batch_sharding)
        self.params, self.opt_state, loss, grad_norm = self._train_step(
            self.params, self.opt_state, batch, np.float32(lr))
        loss, grad_norm = float(loss), float(grad_norm)
        return StepMetrics(loss=loss, grad_norm=grad_norm, skipped=not (np.isfinite(loss) and np.isfinite(grad_norm)))

    def eval_loss(self, tokens: np.ndarray) -> float:
        return float(self._eval_loss(self.params, self._put(np.asarray(tokens, np.int32), self.batch_sharding)))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        out = self._logits(self.params, self._put(np.asarray(tokens, np.int32), self.replicated))
        return np.asarray(self._jax.device_get(out))
