"""The hardware abstraction layer: `make_backend` picks a framework; each backend picks its platform.

Outside models/, this package is the only place that imports jax or torch (lazily, so a torch-only
machine never imports jax for training and the reverse).
"""
from __future__ import annotations

import importlib.util

from hal.base import (Backend, CheckpointDamaged, CheckpointSaveError, HostState, NonFiniteError, OptimizerSpec,
                      Snapshot, StepMetrics, StorageError, UserError, WrongModelError, first_line)

FRAMEWORKS = ("jax", "torch")


def make_backend(hal: dict, model, optim: OptimizerSpec, precision: str = "fp32", remat: bool = False,
                 document_eos: int | None = None, loss_chunk: int = 0) -> Backend:
    """hal: the `hal` config group (framework, platform, mesh, ...). document_eos: the end-of-document token
    id when attention must stay inside each document of a packed window (positions restart per document).
    loss_chunk: tokens per chunk of the cross-entropy (trainer.loss_chunk), 0 = through the whole logits."""
    framework = hal.get("framework")
    if loss_chunk < 0:
        raise UserError(f"trainer.loss_chunk={loss_chunk}: use 0 (the whole logits) or a number of tokens")
    common = dict(platform=hal.get("platform", "auto"), mesh=hal.get("mesh"),
                  mesh_rule=hal.get("mesh_rule", "auto"), instance_type=hal.get("instance_type"),
                  neuron_cfg=hal.get("neuron"), compile_cache_dir=hal.get("compile_cache_dir"), loss_chunk=loss_chunk)
    if framework == "jax":
        _require("jax", "flax", "optax", hint="pip install 'trichip[jax]'")
        from hal.jax_backend import JaxBackend
        return JaxBackend(model, optim, precision, remat=remat, distributed=hal.get("distributed", "auto"),
                          attention=hal.get("attention", "auto"),
                          document_eos=document_eos, **common)
    if framework == "torch":
        _require("torch", hint="pip install torch (on a CPU machine: pip install torch==2.13.0)")
        from hal.torch_backend import TorchBackend
        return TorchBackend(model, optim, precision, remat=remat, compile=bool(hal.get("compile", False)),
                            compile_backend=hal.get("compile_backend", "inductor"), document_eos=document_eos,
                            **common)
    raise UserError(f"unknown framework {framework!r}: use hal=jax or hal=torch")


def _require(*modules: str, hint: str) -> None:
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not installed: {hint}")


def jax_devices() -> dict:
    """{platform: device count} that JAX sees (empty without jax)."""
    if importlib.util.find_spec("jax") is None:
        return {}
    import jax
    out = {}
    for platform in ("cpu", "gpu", "tpu", "neuron"):
        try:
            out[platform] = len(jax.devices(platform))
        except RuntimeError:
            pass
    return out


def torch_devices() -> dict:
    """{'cpu': threads, 'gpu': count} that torch sees (empty without torch)."""
    if importlib.util.find_spec("torch") is None:
        return {}
    import torch
    out = {"cpu": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.device_count()
    return out


__all__ = ["Backend", "CheckpointDamaged", "CheckpointSaveError", "HostState", "NonFiniteError", "OptimizerSpec",
           "Snapshot", "StepMetrics", "StorageError", "UserError", "WrongModelError", "first_line", "make_backend", "FRAMEWORKS", "jax_devices", "torch_devices"]
