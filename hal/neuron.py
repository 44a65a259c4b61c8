"""Neuron hooks: what changes when a backend runs on AWS Trainium, as data chosen per software stack.

Three stacks reach Trainium:
  torchneuron  TorchNeuron (torch-neuronx >= 2.13 on Neuron >= 2.30, trn2/trn3): a native PyTorch
               device `neuron` (PrivateUse1), process-group backend `neuron`, FSDP2 and DTensor,
               torch.compile(backend="neuron"), torch.autocast(device_type="neuron").
  torch-xla    torch-neuronx over torch_xla (trn1 stacks): an XLA device, a step barrier each step
               (torch_xla.sync()), xm.optimizer_step (which all-reduces gradients), host transfer for
               checkpoints, `neuron_parallel_compile` to fill the compile cache from a trial run.
  jax-pjrt     JAX through the `neuron` PJRT plugin (jax-neuronx / libneuronxla).

Those packages come from the Neuron pip repository only (the PyPI names are placeholders). This
module decides; hal/torch_backend.py and hal/jax_backend.py act on the decision. The decisions are
pure functions of a `NeuronProbe` (what is installed), so they are tested on machines without Neuron.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.util
import os

from hal.base import UserError

NEURON_PIP = "--extra-index-url https://pip.repos.neuron.amazonaws.com"
INSTALL = {
    "torchneuron": f"pip install 'torch-neuronx==2.13.*' {NEURON_PIP} (TorchNeuron, Neuron >= 2.30, trn2/trn3)",
    "torch-xla": f"pip install torch-neuronx 'torch-xla==2.9.*' neuronx-cc {NEURON_PIP} (trn1)",
    "jax-pjrt": f"pip install jax-neuronx libneuronxla neuronx-cc {NEURON_PIP}",
}

# NeuronCores per instance (logical cores with the default LNC: trn1 2 per chip, trn2 4 per chip at LNC=2).
CORES = {"trn1.2xlarge": 2, "trn1.32xlarge": 32, "trn1n.32xlarge": 32, "trn2.3xlarge": 4, "trn2.48xlarge": 64,
         "trn2u.48xlarge": 64, "trn3.48xlarge": 64}


@dataclasses.dataclass(frozen=True)
class NeuronProbe:
    """What this machine has, as far as Neuron is concerned."""
    torch_neuron_device: bool = False   # torch knows a `neuron` device (TorchNeuron autoloaded)
    torch_xla: bool = False             # torch_xla imports and torch_neuronx is installed
    jax_plugin: bool = False            # jax's `neuron` PJRT plugin is installed
    neuron_devices: int = 0             # /dev/neuron* count

    @classmethod
    def detect(cls) -> "NeuronProbe":
        def importable(name):
            try:
                return importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                return False
        torch_neuron_device = False
        if importable("torch"):
            import torch
            torch_neuron_device = torch._C._get_privateuse1_backend_name() == "neuron"
        torch_xla = False
        if importable("torch_xla") and importable("torch_neuronx"):
            try:
                import torch_neuronx  # noqa: F401  (the PyPI placeholder raises ImportError)
                torch_xla = True
            except ImportError:
                pass
        jax_plugin = importable("jax_plugins.neuron") or importable("libneuronxla")
        devices = len([d for d in os.listdir("/dev") if d.startswith("neuron")]) if os.path.isdir("/dev") else 0
        return cls(torch_neuron_device, torch_xla, jax_plugin, devices)


class OptimizerStep(enum.StrEnum):
    """How a stack applies an optimizer update."""
    OPTIMIZER = "optimizer.step"      # torch's own
    XM = "xm.optimizer_step"          # torch_xla's: all-reduces the gradients over the replicas, then steps
    OPTAX = "optax"                   # inside the jitted JAX step


class StepBarrier(enum.StrEnum):
    """What must run after every optimizer step."""
    TORCH_XLA_SYNC = "torch_xla.sync"   # cuts torch_xla's lazy graph: one compiled graph per step


@dataclasses.dataclass(frozen=True)
class NeuronHooks:
    stack: str                      # torchneuron | torch-xla | jax-pjrt
    device: str                     # torch device string, or the jax platform name
    process_group_backend: str | None
    step_barrier: StepBarrier | None
    optimizer_step: OptimizerStep
    compile_backend: str | None     # torch.compile backend (torch stacks)
    supports_fsdp2: bool
    autocast_device: str | None     # torch.autocast device_type for bf16
    env: dict                       # environment the stack reads (compile cache, precision, runtime)
    precompile_command: str | None  # how to fill the compile cache from a trial run


def select_stack(framework: str, probe: NeuronProbe) -> str:
    """The stack for `hal=<framework> hal.platform=neuron`, or a one-line UserError naming the install."""
    if framework == "jax":
        if probe.jax_plugin:
            return "jax-pjrt"
        raise UserError(f"hal=jax hal.platform=neuron needs JAX's neuron PJRT plugin, which is not installed: "
                        f"{INSTALL['jax-pjrt']}")
    if probe.torch_neuron_device:
        return "torchneuron"
    if probe.torch_xla:
        return "torch-xla"
    raise UserError(f"hal.platform=neuron needs TorchNeuron (trn2/trn3) or torch-neuronx over torch_xla (trn1), "
                    f"neither is installed: {INSTALL['torchneuron']}; or {INSTALL['torch-xla']}")


def hooks_for(stack: str, precision: str = "bf16", cache_dir: str | None = None,
              stochastic_rounding: bool = True, instance_type: str | None = None) -> NeuronHooks:
    """The hook set for a stack. bf16 on Neuron means autocast with fp32 master weights; when weights
    themselves are bf16, stochastic rounding keeps small updates from vanishing."""
    cache = cache_dir or os.environ.get("NEURON_COMPILE_CACHE_URL") or os.path.expanduser("~/.cache/neuron")
    env = {"NEURON_COMPILE_CACHE_URL": cache,
           "NEURON_RT_STOCHASTIC_ROUNDING_EN": "1" if stochastic_rounding else "0"}
    if instance_type and instance_type.startswith(("trn2", "trn3")):
        env["NEURON_LOGICAL_NC_CONFIG"] = "2"
    # the compiler must not re-cast on its own: precision is what the config says
    cc_flags = ["--auto-cast=none", "--model-type=transformer", f"--cache_dir={cache}"]
    if stack == "torchneuron":
        return NeuronHooks(stack, "neuron", "neuron", None, OptimizerStep.OPTIMIZER, "neuron", True,
                           "neuron" if precision == "bf16" else None, env, None)
    if stack == "torch-xla":
        env.update({"PJRT_DEVICE": "NEURON", "NEURON_CC_FLAGS": " ".join(cc_flags)})
        return NeuronHooks(stack, "xla", "xla", StepBarrier.TORCH_XLA_SYNC, OptimizerStep.XM, None, False,
                           "xla" if precision == "bf16" else None, env,
                           "neuron_parallel_compile torchrun ... -m launch.train ... trainer.steps=<a few>")
    if stack == "jax-pjrt":
        env.update({"NEURON_CC_FLAGS": " ".join(cc_flags), "JAX_PLATFORMS": "neuron"})
        return NeuronHooks(stack, "neuron", None, None, OptimizerStep.OPTAX, None, False, None, env,
                           "python -m launch.train hal=jax hal.platform=neuron trainer.steps=<a few>")
    raise ValueError(f"unknown Neuron stack {stack!r}")


def rank_env(local_rank: int, nproc_per_node: int, instance_type: str | None) -> dict:
    """NeuronCore-to-rank mapping for torchrun: each local rank owns an equal, contiguous block of cores."""
    cores = CORES.get(instance_type or "", nproc_per_node)
    if cores % nproc_per_node:
        raise UserError(f"--nproc-per-node {nproc_per_node} does not divide the {cores} NeuronCores of "
                        f"{instance_type}; use a divisor of {cores}")
    per = cores // nproc_per_node
    first = local_rank * per
    visible = str(first) if per == 1 else f"{first}-{first + per - 1}"
    return {"NEURON_RT_VISIBLE_CORES": visible, "NEURON_RT_NUM_CORES": str(per)}


def apply_env(hooks: NeuronHooks, local_rank: int = 0, nproc_per_node: int = 1,
              instance_type: str | None = None) -> dict:
    """Set the stack's environment for this process (before the runtime starts); returns what was set.
    Values the user exported already win."""
    env = dict(hooks.env)
    env.update(rank_env(local_rank, nproc_per_node, instance_type))
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return env


def setup(framework: str, precision: str, neuron_cfg: dict | None, instance_type: str | None,
          local_rank: int = 0, local_world_size: int = 1) -> NeuronHooks:
    """A backend's Neuron setup for `hal.platform=neuron`: the stack installed here for `framework`, its
    hooks (hal.neuron config: cache_dir, stochastic_rounding), and its environment set for this rank."""
    cfg = neuron_cfg or {}
    hooks = hooks_for(select_stack(framework, NeuronProbe.detect()), precision, cfg.get("cache_dir"),
                      cfg.get("stochastic_rounding", True), instance_type)
    apply_env(hooks, local_rank, local_world_size, instance_type)
    return hooks
