"""The hardware abstraction layer's one interface. trainer/ talks to every chip family through it.

Everything crossing this interface is framework-free: NumPy arrays in the canonical layout
(models.spec names, HF Llama shapes, float32) and Python scalars.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import os
from typing import Callable

import numpy as np

from hal import layout
from models.errors import (CheckpointDamaged, StorageError, UserError, WrongModelError,  # noqa: F401  (re-exported)
                           first_line)
from models.spec import LlamaConfig, decays, param_shapes


# fp32: fp32 compute; bf16: bf16 compute; fp8: the decoder blocks' projections in float8 (e4m3 forward, e5m2
# gradients), the rest in bf16. Params and optimizer state are fp32 in every case.
PRECISIONS = ("fp32", "bf16", "fp8")
FP8_MIN_CAPABILITY = (8, 9)


class CheckpointSaveError(StorageError):
    """A checkpoint could not be written (disk full, file size limit, permissions); older ones are intact."""


class NonFiniteError(UserError):
    """The loss or gradient went NaN/inf and the policy is to stop; the last good checkpoint is kept."""
    exit_code = 4


@dataclasses.dataclass
class OptimizerSpec:
    """AdamW, one semantics on every backend (documented in README "Optimizer semantics").

    Per update, with g the gradient and t = count + 1:
      g <- g / ||g|| * max_grad_norm          if ||g|| > max_grad_norm (global norm over all params)
      m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
      p <- p - lr * ( (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * p * [p is 2-D] )
    lr comes from the trainer each step (a pure function of count).
    """
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0


@dataclasses.dataclass
class HostState:
    """The canonical train state on the host: what checkpoints hold and every backend can load.

    params, mu (first moments), nu (second moments): {canonical name: float32 array}.
    count: the number of optimizer updates applied (optax's count, torch's `step`).
    """
    params: dict[str, np.ndarray]
    mu: dict[str, np.ndarray]
    nu: dict[str, np.ndarray]
    count: int

    @classmethod
    def fresh(cls, params: dict[str, np.ndarray]) -> "HostState":
        zeros = {k: np.zeros_like(v, dtype=np.float32) for k, v in params.items()}
        return cls(params=params, mu=zeros, nu={k: np.zeros_like(v) for k, v in zeros.items()}, count=0)

    def tensors(self) -> dict[str, np.ndarray]:
        """Flat {storage name: array} (hal.layout's names)."""
        return layout.join(self.params, self.mu, self.nu, np.asarray(self.count, layout.COUNT_DTYPE))

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> "HostState":
        g = layout.split(tensors)
        return cls(params=g.params, mu=g.mu, nu=g.nu, count=int(g.count))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The train state captured for a checkpoint (Backend.snapshot): `write(path)` writes it under `path`
    and returns {storage name: {shape, dtype, part}}; `held`: the device arrays the write holds (copies
    of the state), for callers that wait on them, or None where nothing stays on a device."""
    write: Callable[[str], dict]
    held: object = None

    def __call__(self, path: str) -> dict:
        return self.write(path)

    @property
    def tensors(self):
        """The earlier name of `held`."""
        return self.held


@dataclasses.dataclass
class StepMetrics:
    loss: float
    grad_norm: float
    skipped: bool = False   # the update was not applied (non-finite loss or gradient)


class Backend(abc.ABC):
    """One framework on one platform. Constructed with the model and optimizer; holds the train state."""

    framework: str   # "jax" | "torch"
    _micro_batch: int | None = None     # set by check_batch: the rows of a whole micro-batch
    platform: str    # "cpu" | "gpu" | "tpu" | "neuron"

    def __init__(self, model: LlamaConfig, optim: OptimizerSpec, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise UserError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model, self.optim, self.precision = model, optim, precision

    @abc.abstractmethod
    def describe(self) -> dict:
        """Framework, platform, versions and devices, for logs and checkpoint manifests."""

    @abc.abstractmethod
    def set_state(self, state: HostState) -> None:
        """Place a canonical host state on the devices (replacing any state held)."""

    @abc.abstractmethod
    def get_state(self) -> HostState:
        """Copy the train state to the host in the canonical layout."""

    @abc.abstractmethod
    def train_step(self, tokens: np.ndarray, lr: float) -> StepMetrics:
        """One optimizer update on a global batch.

        tokens: int32 [accum, micro_batch, seq_len + 1]; the loss is the mean over every target token,
        gradients are accumulated over `accum` micro-batches before the one update.
        """

    @abc.abstractmethod
    def eval_loss(self, tokens: np.ndarray) -> float:
        """Mean loss over int32 [n, micro_batch, seq_len + 1] without updating anything."""

    @abc.abstractmethod
    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """float32 logits [B, T, vocab] of the current params for int32 tokens [B, T]."""

    # -- checkpoints and processes. Defaults: one process holding the whole state on the host. ----
    process_index = 0
    process_count = 1
    async_save_default = True     # trainer.async_save=auto
    compile_cache_dir: str | None = None    # the persistent compile cache this backend uses (hal/compile_cache.py)

    def compilations(self) -> dict:
        """Compilation counts of the step functions, where the backend compiles them."""
        return {}

    def check_batch(self, micro_batch: int) -> None:
        """Raise UserError if the micro-batch cannot be split over this backend's devices/processes."""

    def batch_rows(self, micro_batch: int) -> slice:
        """The rows of each micro-batch that this process's devices consume. train_step and eval_loss take
        token batches [n, micro_batch, T + 1], or [n, rows, T + 1] holding only these rows, so a process
        need not read the rows of the others."""
        return slice(0, micro_batch)

    def snapshot(self, copy: bool = True) -> Snapshot:
        """Capture the train state now. The Snapshot's `write(path)` writes it under `path` and returns
        {storage name: {shape, dtype, part}} (`part`: this process's share of the tensor's digest).

        This call is the only part that blocks training: with copy=True what `write` needs is copied
        (on the device where it can be), so training may go on while another thread runs `write`.
        `write` issues no process collectives (orbax's barriers go through the jax.distributed key-value
        store), so it is safe beside the training step's. copy=False: `write` must run before the next step."""
        from hal import store
        t = self.get_state().tensors()       # host copies already
        return Snapshot(lambda path: store.write_and_describe(path, t, self.process_index))

    def combine(self, written: dict) -> dict:
        """{name: {shape, dtype, part}} of every process -> {name: {shape, dtype, digest}} (collective)."""
        names = list(written)
        parts = np.array([written[n]["part"] for n in names], np.uint64)
        if self.process_count > 1:
            parts = self.allreduce(parts)
        return {n: {"shape": written[n]["shape"], "dtype": written[n]["dtype"], "digest": int(d)}
                for n, d in zip(names, parts)}

    def load(self, path: str, manifest_tensors: dict, name=None) -> dict:
        """Replace the train state with the checkpoint tensors under `path` (a checkpoint's state/), each
        checked against `manifest_tensors` (hal.layout.verify) before the state is replaced. Returns
        {storage name: {shape, dtype, digest}} of what was read. `name`: how errors call the checkpoint
        (default: the directory holding `path`). Raises WrongModelError when the manifest lists another
        model's tensors, CheckpointDamaged, or StorageError (hal.store.read_tensors)."""
        from hal import store
        name = self._check_model_tensors(path, manifest_tensors, name)
        t, found = store.read_and_summarize(path, list(manifest_tensors), name=name)
        layout.verify(manifest_tensors, found, name)
        self._set_read_state(HostState.from_tensors(t))
        return found

    def _set_read_state(self, state: HostState) -> None:
        """set_state for a state just read from a checkpoint: its arrays belong to nobody else, so a
        backend may keep them as its own storage instead of copying them."""
        self.set_state(state)

    def _check_model_tensors(self, path: str, manifest_tensors: dict, name) -> str:
        """Raise WrongModelError unless the manifest lists exactly this model's tensors and shapes; returns
        the checkpoint's name for messages."""
        name = name or os.path.dirname(os.path.abspath(path))
        problem = layout.model_mismatch(manifest_tensors, layout.state_shapes(param_shapes(self.model)))
        if problem:
            raise WrongModelError(f"checkpoint {name} does not hold this model's train state: {problem}")
        return name

    def allreduce(self, values: np.ndarray) -> np.ndarray:
        """Sum a uint64 vector over processes (mod 2**64)."""
        return values

    def barrier(self, name: str) -> None:
        """Wait for every process."""


def loss_chunk_under(loss_chunk: int, tensor: int) -> int:
    """trainer.loss_chunk as a backend applies it on a mesh with `tensor` tensor-parallel ranks: 0 (the
    whole logits) under tensor parallelism, where the hidden states are split over the sequence and the
    logits over the vocabulary, so no device holds a chunk's worth of either."""
    if loss_chunk and tensor > 1:
        logging.getLogger("trichip").info(
            "trainer.loss_chunk=%d: the loss takes the whole logits under tensor parallelism (hal.mesh.tensor=%d "
            "splits them and the hidden states)", loss_chunk, tensor)
        return 0
    return loss_chunk


def check_fp8(chip: str, capability: tuple[int, int] | None) -> None:
    """Refuse trainer.precision=fp8 unless the chip multiplies float8 on its tensor cores: NVIDIA GPUs of
    CUDA compute capability 8.9 (Ada: L4, L40S, RTX 40xx) and up (Hopper H100/H200, Blackwell B200).
    capability: (major, minor), or None for a chip that is not a CUDA GPU (CPU, TPU, Neuron, ROCm)."""
    if capability is None or tuple(capability) < FP8_MIN_CAPABILITY:
        raise UserError(f"trainer.precision=fp8 needs a GPU with float8 tensor cores (CUDA compute capability 8.9+: "
                        f"H100, H200, B200, L4, L40S, RTX 40xx); {chip} has none: use trainer.precision=bf16")


def decay_mask(shapes: dict[str, tuple]) -> dict[str, bool]:
    return {k: decays(k, tuple(s)) for k, s in shapes.items()}
