"""JAX backend: Flax model, Optax AdamW, one jax.jit'ed train step over a device Mesh (TPU, GPU,
Neuron PJRT plugin, CPU host devices), NamedSharding through logical axis rules, multi-host through
jax.distributed."""
from __future__ import annotations

import logging

import numpy as np

from hal import compile_cache, layout, neuron, store
from hal import mesh as meshlib
from hal.base import (Backend, HostState, OptimizerSpec, Snapshot, StepMetrics, UserError, check_fp8, first_line,
                      loss_chunk_under)
from hal.distributed import initialize_jax, launch_env
from models.spec import RESIDUAL_AXES, LlamaConfig, flatten, logical_axes, nest, param_shapes

log = logging.getLogger(__name__)

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
            raise UserError(f"hal.platform={platform} but JAX cannot start it ({first_line(e)}); "
                            f"install the matching jax plugin or use hal.platform=auto") from None
        if found != platform:
            raise UserError(f"hal.platform={platform} but JAX found only {found} devices; install the matching "
                            f"jax plugin (e.g. pip install 'jax[cuda12]') or use hal.platform=auto")
    return _PLATFORM_OF.get(jax.default_backend(), jax.default_backend())


def _configure(jax, precision: str, compile_cache_dir: str | None):
    """fp32 means fp32 matmuls (GPUs default to TF32-class ones; parity with torch needs fp32); the
    persistent compile cache (hal.compile_cache_dir, on by default: hal/compile_cache.py) keeps compiled
    programs across restarts (a precompile run fills it). Returns the cache's directory, None when off."""
    if precision == "fp32":
        jax.config.update("jax_default_matmul_precision", "highest")
    return compile_cache.configure_jax(jax, compile_cache_dir)


def _attention_impl(asked: str, platform: str, precision: str) -> str:
    """hal.attention: auto = cuDNN flash attention on GPUs in bf16 (it takes no fp32; fp8 computes attention
    in bf16), XLA's elsewhere."""
    bf16_compute = precision in ("bf16", "fp8")
    if asked == "auto":
        return "cudnn" if platform == "gpu" and bf16_compute else "xla"
    if asked not in ("xla", "cudnn"):
        raise UserError(f"hal.attention={asked!r} is not one of auto, xla, cudnn")
    if asked == "cudnn" and (platform != "gpu" or not bf16_compute):
        raise UserError(f"hal.attention=cudnn needs hal.platform=gpu and trainer.precision=bf16 or fp8 "
                        f"(here: {platform}, {precision}); use hal.attention=auto")
    return asked


def _cuda_capability(jax, platform: str) -> tuple[int, int] | None:
    """The CUDA compute capability (major, minor) of the first device; None where it is not a CUDA GPU."""
    capability = getattr(jax.devices()[0], "compute_capability", None) if platform == "gpu" else None
    try:
        return tuple(int(part) for part in str(capability).split(".")[:2]) if capability else None
    except ValueError:          # not a CUDA capability (e.g. a ROCm device's gfx name)
        return None


def make_loss_fn(apply, cross_entropy):
    """loss(params, tokens [B, T + 1]): mean next-token cross-entropy of `apply`, a Flax module's apply."""
    def loss_fn(params, tokens):
        logits = apply({"params": params}, tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])
    return loss_fn


def make_chunked_loss_fn(net, loss_chunk: int, batch_shards: int):
    """loss(params, tokens [B, T + 1]): the mean next-token cross-entropy of `net` (models.llama_jax's
    LlamaForCausalLM) without its whole logits: models.llama_jax.chunked_cross_entropy over chunks of about
    `loss_chunk` tokens of the B / batch_shards rows each device holds (the positions are chunked, so the
    batch sharding carries into every chunk)."""
    from models.llama_jax import LlamaForCausalLM, chunked_cross_entropy, output_weight

    def loss_fn(params, tokens):
        h = net.apply({"params": params}, tokens[:, :-1], method=LlamaForCausalLM.hidden_states)
        rows = max(1, tokens.shape[0] // batch_shards)
        return chunked_cross_entropy(h, output_weight(params, net.cfg), tokens[:, 1:], max(1, loss_chunk // rows))
    return loss_fn


def sequence_parallel(apply, mesh, sizes: dict):
    """`apply` (a Flax module's apply) with the residual stream between the blocks laid out as the logical
    rules say for models.spec.RESIDUAL_AXES (batch, seq, act_embed): the sequence split over the tensor
    axis, so the norms and residual adds run on seq_len / tensor positions per device, as torch's sequence
    parallelism does; XLA gathers the sequence before attention and the MLP, and reduce-scatters after."""
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from models.llama_jax import DecoderLayer

    def constrain(x):
        spec = P(*meshlib.partition(RESIDUAL_AXES, x.shape, sizes))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def residual_sharded(next_fun, args, kwargs, context):
        if not (isinstance(context.module, DecoderLayer) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        return constrain(next_fun(constrain(args[0]), *args[1:], **kwargs))

    def sequence_parallel_apply(*args, **kwargs):
        with nn.intercept_methods(residual_sharded):
            return apply(*args, **kwargs)
    return sequence_parallel_apply


def make_train_step(loss_fn, tx):
    """(params, opt_state, tokens [accum, B, T + 1], lr) -> (params, opt_state, loss, grad_norm): gradients
    averaged over the `accum` micro-batches (a scan), then one update of the optax transform `tx`
    scaled by -lr. A non-finite loss or gradient never reaches the state: the update (and its count)
    is skipped, through a cond: selecting between old and new state would cost one more pass over
    the params and both moments."""
    import jax
    import jax.numpy as jnp
    import optax
    grad_fn = jax.value_and_grad(loss_fn)

    def mean_grads(params, tokens):
        if tokens.shape[0] == 1:
            return grad_fn(params, tokens[0])

        def micro(acc, tok):
            return jax.tree.map(jnp.add, acc, grad_fn(params, tok)), None
        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        total, _ = jax.lax.scan(micro, zero, tokens)
        return jax.tree.map(lambda x: x / tokens.shape[0], total)

    def train_step(params, opt_state, tokens, lr):
        loss, grads = mean_grads(params, tokens)
        grad_norm = optax.tree.norm(grads)

        def update(operand):
            params, opt_state, grads = operand
            updates, new_opt_state = tx.update(grads, opt_state, params)
            return jax.tree.map(lambda p, u: p - lr * u, params, updates), new_opt_state

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_params, new_opt_state = jax.lax.cond(finite, update, lambda operand: operand[:2],
                                                 (params, opt_state, grads))
        return new_params, new_opt_state, loss, grad_norm
    return train_step


def make_eval_loss(loss_fn):
    """(params, tokens [n, B, T + 1]) -> the mean of the n micro-batch losses."""
    import jax

    def eval_loss(params, tokens):
        return jax.lax.map(lambda tok: loss_fn(params, tok), tokens).mean()
    return eval_loss


def adamw(optim: OptimizerSpec, decay_mask):
    """AdamW as hal.base.OptimizerSpec defines it, without the learning rate (the step scales by -lr)."""
    import optax
    return optax.chain(
        optax.clip_by_global_norm(optim.max_grad_norm),
        optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
        optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
    )


class JaxBackend(Backend):
    framework = "jax"

    def __init__(self, model: LlamaConfig, optim: OptimizerSpec, precision: str = "fp32",
                 platform: str = "auto", remat: bool = False, mesh: dict | None = None,
                 mesh_rule: str = "auto", instance_type: str | None = None, distributed="auto",
                 compile_cache_dir: str | None = None, neuron_cfg: dict | None = None, attention: str = "auto",
                 document_eos: int | None = None, loss_chunk: int = 0):
        super().__init__(model, optim, precision)
        self.loss_chunk = loss_chunk
        self.hooks = None
        if platform == "neuron":   # never run on Trainium hardware here: see hal/neuron.py
            env = launch_env()
            self.hooks = neuron.setup("jax", precision, neuron_cfg, instance_type, env.local_rank,
                                      env.local_world_size)
        import jax
        initialize_jax(distributed)
        self.platform = _select_platform(platform)
        self._jax = jax
        if precision == "fp8":
            check_fp8(jax.devices()[0].device_kind, _cuda_capability(jax, self.platform))
        cache = _configure(jax, precision, compile_cache_dir)
        self.compile_cache_dir = cache and str(cache)
        self._place_on_mesh(mesh, mesh_rule, instance_type)
        self.attention = _attention_impl(attention, self.platform, precision)
        self._build_model(remat, document_eos)
        self._compile_functions()
        self.params = self.opt_state = None
        self._bytes_logged = False

    def _place_on_mesh(self, mesh: dict | None, mesh_rule: str, instance_type: str | None) -> None:
        """The device mesh, and the shardings of params, optimizer state and batches on it."""
        jax = self._jax
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        n = jax.device_count()
        self.mesh_sizes, self.mesh_source = meshlib.choose(mesh, mesh_rule, meshlib.instance_type(instance_type), n)
        meshlib.check_tensor_degree(self.model, self.mesh_sizes["tensor"], "jax")
        self.mesh = jax.make_mesh(tuple(self.mesh_sizes[a] for a in meshlib.AXES), meshlib.AXES,
                                  axis_types=(AxisType.Auto,) * len(meshlib.AXES))
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        specs = {k: P(*meshlib.partition(logical_axes(k, s), s, self.mesh_sizes))
                 for k, s in param_shapes(self.model).items()}
        self.param_shardings = {k: NamedSharding(self.mesh, spec) for k, spec in specs.items()}
        self.replicated = NamedSharding(self.mesh, P())
        batch_axes = meshlib.partition(("batch",), (self._batch_divisor(),), self.mesh_sizes)[0]
        self.batch_sharding = NamedSharding(self.mesh, P(None, batch_axes, None))

    def _build_model(self, remat: bool, document_eos: int | None) -> None:
        import jax.numpy as jnp
        from models.llama_jax import LlamaForCausalLM
        dtype = jnp.bfloat16 if self.precision in ("bf16", "fp8") else jnp.float32
        self.net = LlamaForCausalLM(self.model, dtype=dtype, remat=remat,
                                    attention=None if self.attention == "xla" else self.attention,
                                    document_eos=document_eos, fp8=self.precision == "fp8")
        self.tx = adamw(self.optim, nest({k: len(s) == 2 for k, s in param_shapes(self.model).items()}))

    def _compile_functions(self) -> None:
        """The jitted train step, eval loss, logits and snapshot copy, with explicit shardings."""
        jax = self._jax
        import jax.numpy as jnp
        net, rep, batch = self.net, self.replicated, self.batch_sharding
        p_sh = nest(self.param_shardings)
        opt_sh = self._opt_shardings(p_sh)
        loss_fn = self._make_loss_fn()
        self._train_step = jax.jit(make_train_step(loss_fn, self.tx), donate_argnums=(0, 1),
                                   in_shardings=(p_sh, opt_sh, batch, rep), out_shardings=(p_sh, opt_sh, rep, rep))
        self._eval_loss = jax.jit(make_eval_loss(loss_fn), in_shardings=(p_sh, batch), out_shardings=rep)
        # a real copy (jit forwards an input returned unchanged; jnp.copy makes a new buffer)
        self._copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
        self._copy_warm = False
        self._logits = jax.jit(lambda params, tokens: net.apply({"params": params}, tokens),
                               in_shardings=(p_sh, rep), out_shardings=rep)

    def _make_loss_fn(self):
        """The loss of the train step and eval: chunked (trainer.loss_chunk > 0) except under tensor
        parallelism, where the hidden states are split over the sequence and the logits over the vocabulary."""
        from models.llama_jax import cross_entropy
        chunk = loss_chunk_under(self.loss_chunk, self.mesh_sizes["tensor"])
        if chunk:
            return make_chunked_loss_fn(self.net, chunk, self._batch_divisor())
        apply = self.net.apply
        if self.mesh_sizes["tensor"] > 1:
            apply = sequence_parallel(apply, self.mesh, self.mesh_sizes)
        return make_loss_fn(apply, cross_entropy)

    def _batch_divisor(self) -> int:
        return self.mesh_sizes["data"] * self.mesh_sizes["fsdp"]

    def check_batch(self, micro_batch: int) -> None:
        self._micro_batch = micro_batch
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
                "mesh": dict(self.mesh_sizes), "mesh_source": self.mesh_source,
                "bytes_per_device": self.state_bytes()}

    # -- state ---------------------------------------------------------------------------------
    def batch_rows(self, micro_batch: int) -> slice:
        """This process's devices' rows of the batch sharding (contiguous under a process-major device order;
        otherwise every row, placed by each process from the whole batch)."""
        shards = self.batch_sharding.addressable_devices_indices_map((1, micro_batch, 1)).values()
        rows = sorted({r for idx in shards for r in range(*idx[1].indices(micro_batch))})
        if rows and rows == list(range(rows[0], rows[-1] + 1)):
            return slice(rows[0], rows[-1] + 1)
        return slice(0, micro_batch)

    _rows, _rows_of = None, None     # batch_rows of the last micro-batch size placed

    def _put_batch(self, tokens):
        """Token batch [n, micro_batch or this process's rows, T + 1] -> the global batch array."""
        t = np.asarray(tokens, np.int32)
        micro = self._micro_batch or t.shape[1]
        if t.shape[1] == micro:
            return self._put(t, self.batch_sharding)
        rows = self._rows if self._rows_of == micro else self.batch_rows(micro)
        self._rows, self._rows_of = rows, micro
        if t.shape[1] != rows.stop - rows.start:
            raise ValueError(f"a batch of {t.shape[1]} rows is neither the micro-batch ({micro}) nor this "
                             f"process's rows {rows.start}:{rows.stop}")
        return self._jax.make_array_from_process_local_data(self.batch_sharding, t, (t.shape[0], micro, t.shape[2]))

    def _put(self, array, sharding):
        """A host array (the same on every process) -> a global jax.Array; each process places its shards."""
        array = np.asarray(array)
        return self._jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])

    def _shardings(self) -> dict:
        sh = self.param_shardings
        return layout.join(sh, sh, sh, self.replicated)

    def _set_tensors(self, t: dict) -> None:
        g = layout.split(t)
        self.params = nest(g.params)
        init = self._jax.eval_shape(self.tx.init, self.params)
        adam = init[1]._replace(count=g.count, mu=nest(g.mu), nu=nest(g.nu))
        self.opt_state = (init[0], adam, init[2])

    def set_state(self, state: HostState) -> None:
        t = state.tensors()
        sh = self._shardings()
        self._set_tensors({k: self._put(v, sh[k]) for k, v in t.items()})
        self._warm_copy()

    def _warm_copy(self) -> None:
        """Compile the snapshot copy now, not inside the first async save (where it would block training)."""
        if not self._copy_warm:
            self._copy.lower(self._tensors()).compile()
            self._copy_warm = True

    def _tensors(self) -> dict:
        adam = self.opt_state[1]
        return layout.join(flatten(self.params), flatten(adam.mu), flatten(adam.nu), adam.count)

    def get_state(self) -> HostState:
        from jax.experimental import multihost_utils
        t = self._tensors()
        if self.process_count > 1:
            t = multihost_utils.process_allgather(t, tiled=True)
        return HostState.from_tensors({k: np.asarray(self._jax.device_get(v)) for k, v in t.items()})

    def snapshot(self, copy: bool = True) -> Snapshot:
        """Each process writes the shards it holds (no gather). copy=True: a copy on the device, dispatched
        before the next step can donate the state's buffers (blocks only as long as that copy takes); the
        Snapshot holds those copies."""
        t = self._copy(self._tensors()) if copy else self._tensors()
        return Snapshot(lambda path: store.write_and_describe(path, t, self.process_index), held=t)

    def load(self, path: str, manifest_tensors: dict, name=None) -> dict:
        """Restore straight into this mesh's shardings (any writer, any device count), checked like
        Backend.load before the state is replaced."""
        name = self._check_model_tensors(path, manifest_tensors, name)
        sh = self._shardings()
        t, found = store.read_and_summarize(path, list(sh), shardings=sh, name=name,
                                            allreduce=self.allreduce if self.process_count > 1 else None)
        layout.verify(manifest_tensors, found, name)
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
        batch = self._put_batch(tokens)
        step_args = (self.params, self.opt_state, batch, np.float32(lr))
        self.params, self.opt_state, loss, grad_norm = self._train_step(*step_args)
        loss, grad_norm = float(loss), float(grad_norm)
        if not self._bytes_logged:
            self._bytes_logged = True
            self._log_bytes(step_args)
        return StepMetrics(loss=loss, grad_norm=grad_norm, skipped=not (np.isfinite(loss) and np.isfinite(grad_norm)))

    def state_bytes(self) -> dict:
        """Bytes of train state on this process's first device, measured on its shards: parameters and the
        optimizer state (AdamW's moments and count). Before a state is placed: the shards' shapes."""
        def on_device(tree) -> int:
            return sum(leaf.addressable_shards[0].data.nbytes for leaf in self._jax.tree.leaves(tree))
        if self.params is None:
            params = sum(4 * int(np.prod(sh.shard_shape(param_shapes(self.model)[k])))
                         for k, sh in self.param_shardings.items())
            return {"params": params, "optimizer": 2 * params + 4}
        return {"params": on_device(self.params), "optimizer": on_device(self.opt_state)}

    def _log_bytes(self, step_args) -> None:
        """Log the per-device bytes of the layout: the state's, and XLA's temporaries of the train step (the
        activations kept for the backward pass, gradients, gathered weights) from its memory analysis. The
        step is compiled already: lowering it again finds it in JAX's cache."""
        shapes = self._jax.tree.map(lambda a: self._jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                    step_args[:3])
        analysis = self._train_step.lower(*shapes, step_args[3]).compile().memory_analysis()
        temporaries = getattr(analysis, "temp_size_in_bytes", None)
        parts = dict(self.state_bytes(), **({"step temporaries": temporaries} if temporaries is not None else {}))
        log.info("process %d: each device holds %s (temporaries: XLA's memory analysis of the train step: "
                 "activations, gradients, gathered weights)", self.process_index,
                 ", ".join(f"{k} {v / 2 ** 20:.2f} MiB" for k, v in parts.items()))

    def eval_loss(self, tokens: np.ndarray) -> float:
        return float(self._eval_loss(self.params, self._put_batch(tokens)))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        out = self._logits(self.params, self._put(np.asarray(tokens, np.int32), self.replicated))
        return np.asarray(self._jax.device_get(out))
