"""Neuron hooks: what changes when a backend runs on AWS Trainium, as data chosen per software stack.

Three stacks reach Trainium (AWS Neuron SDK 2.33):
  torchneuron  TorchNeuron: torch-neuronx 2.13.3 / 2.14.3 with PyTorch 2.13 / 2.14, trn2 and trn3 only
               (public beta since Neuron 2.33): a native PyTorch device `neuron` (PrivateUse1),
               process-group backend `neuron`, FSDP2 and DTensor, torch.compile(backend="neuron"),
               torch.autocast(device_type="neuron").
  torch-xla    torch-neuronx 2.9 over torch_xla. PyTorch/XLA training is unsupported from Neuron 2.30 on;
               the last release that supports it is Neuron 2.29.1, so that is the pinned install (for
               trn1, where TorchNeuron does not run). An XLA device, xm.reduce_gradients then
               optimizer.step, a step barrier each step (torch_xla.sync()), no torch.compile, no FSDP2,
               `neuron_parallel_compile` to fill the compile cache from a trial run.
  jax-pjrt     JAX through the `neuron` PJRT plugin (libneuronxla), installed with jax-neuronx; trn1,
               trn2 and trn3 on the current SDK.

Those packages come from the Neuron pip repository only (the PyPI names are placeholders). This
module decides; hal/torch_backend.py and hal/jax_backend.py act on the decision. Each decision is a
pure function of what is installed (`NeuronProbe`), the instance type and the launch environment
(ranks, the user's NEURON_RT_VISIBLE_CORES), so each is tested on machines without Neuron.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.util
import logging
import os

from hal.base import UserError
from hal.distributed import LaunchEnv, launch_env
from hal.mesh import instance_type as configured_instance_type

NEURON_PIP = "--extra-index-url https://pip.repos.neuron.amazonaws.com"
TORCH_CPU_PIP = "--extra-index-url https://download.pytorch.org/whl/cpu"
# Neuron 2.29.1: the last release with PyTorch/XLA training (its torch-neuronx and neuronx-cc, Python 3.10-3.12)
TORCH_XLA_RELEASE = "2.29.1"
INSTALL = {
    "torchneuron": f"pip install 'torch-neuronx==2.13.*' 'neuronx-cc==2.*' nki {NEURON_PIP} {TORCH_CPU_PIP} "
                   f"(TorchNeuron, Neuron >= 2.33, trn2/trn3; torch-neuronx==2.14.* with PyTorch 2.14)",
    "torch-xla": f"pip install torch-neuronx==2.9.0.2.13.26312 neuronx-cc==2.24.8799.0 {NEURON_PIP} "
                 f"(PyTorch/XLA, Neuron {TORCH_XLA_RELEASE}: the last release with PyTorch/XLA training)",
    "jax-pjrt": f"pip install 'jax-neuronx[stable]' {NEURON_PIP}",
}

# Logical NeuronCores per instance at the default LNC (trn1: 2 a chip; trn2: 8 physical cores a chip,
# paired into 4 logical ones at LNC=2).
CORES = {"trn1.2xlarge": 2, "trn1.32xlarge": 32, "trn1n.32xlarge": 32, "trn2.3xlarge": 4, "trn2.48xlarge": 64,
         "trn2u.48xlarge": 64, "trn3.48xlarge": 64}
# Instance types whose numbers above the Neuron documentation does not give.
UNVERIFIED = {"trn3.48xlarge": "the Neuron docs name Trn3 UltraServers only; 64 logical cores is assumed"}

# Where each stack runs (instance families, as the Neuron release notes state), which Neuron release,
# what is tested here without Trainium, and what has never run on it. README: "Trainium support matrix".
SUPPORT = {
    "torchneuron": {"families": ("trn2", "trn3"), "release": "Neuron >= 2.33 (TorchNeuron public beta)",
                    "tested_here": "hook decisions; FSDP2, bf16 autocast, the train step and checkpoints on CPU "
                                   "gloo processes",
                    "never_ran": "the neuron device and process group, torch.compile(backend='neuron'), "
                                 "NEURON_RT_VISIBLE_CORES per rank"},
    "torch-xla": {"families": ("trn1", "trn2"), "release": f"Neuron {TORCH_XLA_RELEASE} pinned (PyTorch/XLA training "
                                                           f"is unsupported from 2.30)",
                  "tested_here": "hook decisions; host collectives on a gloo group and checkpoints without FSDP2 on "
                                 "CPU gloo processes; clipping with the norm kept on the device",
                  "never_ran": "torch_xla itself: the XLA device, xm.reduce_gradients, torch_xla.sync, "
                               "neuron_parallel_compile"},
    "jax-pjrt": {"families": ("trn1", "trn2", "trn3"), "release": "Neuron 2.33 (jax-neuronx; libneuronxla 3.* for "
                                                                 "JAX 0.7-0.10)",
                 "tested_here": "hook decisions; the jitted step, meshes and multi-process JAX on the CPU",
                 "never_ran": "the neuron PJRT plugin, NEURON_PJRT_PROCESSES_NUM_DEVICES / NEURON_PJRT_PROCESS_INDEX"},
}


def family(instance_type: str | None) -> str | None:
    """trn1 | trn2 | trn3 for a Trainium instance type (trn1n and trn2u included); None otherwise."""
    if not instance_type or not instance_type.startswith("trn"):
        return None
    return instance_type[:4]


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


def jax_install(jax_version: str | None) -> str:
    """How to add the Neuron plugin to this JAX: JAX 0.7.0 to 0.10.0 need libneuronxla 3.*, older JAX
    libneuronxla 2.*; without JAX, jax-neuronx[stable] brings a tested JAX with it."""
    if not jax_version:
        return INSTALL["jax-pjrt"]
    version = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in jax_version.split(".")[:3])
    libneuronxla = "3.*" if version >= (0, 7) else "2.*"
    tested = "" if version <= (0, 10, 0) else " (JAX NeuronX supports JAX up to 0.10.0)"
    return f"pip install jax-neuronx 'libneuronxla=={libneuronxla}' 'neuronx-cc==2.*' {NEURON_PIP}{tested}"


class OptimizerStep(enum.StrEnum):
    """How a stack applies an optimizer update."""
    OPTIMIZER = "optimizer.step"      # torch's own (FSDP2 has reduced the gradients in its backward)
    XM = "xm.reduce_gradients"        # torch_xla: gradients all-reduced over the replicas, then optimizer.step
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
    compile_backend: str | None     # torch.compile backend; None: the stack does not take torch.compile
    supports_fsdp2: bool
    autocast_device: str | None     # torch.autocast device_type for bf16
    env: dict                       # environment the stack reads (compile cache, precision, runtime)
    precompile_command: str | None  # how to fill the compile cache from a trial run


def select_stack(framework: str, probe: NeuronProbe, instance_type: str | None = None) -> str:
    """The stack for `hal=<framework> hal.platform=neuron` on `instance_type`, or a one-line UserError
    naming what to install or change."""
    if framework == "jax":
        if probe.jax_plugin:
            return "jax-pjrt"
        raise UserError(f"hal=jax hal.platform=neuron needs JAX's neuron PJRT plugin, which is not installed: "
                        f"{INSTALL['jax-pjrt']}")
    fam = family(instance_type)
    if probe.torch_neuron_device:
        if fam == "trn1":
            raise UserError(f"TorchNeuron runs on trn2/trn3 only, not {instance_type}: train on trn1 with "
                            f"hal=jax hal.platform=neuron ({INSTALL['jax-pjrt']}), or with PyTorch/XLA "
                            f"in a separate environment: {INSTALL['torch-xla']}")
        return "torchneuron"
    if probe.torch_xla:
        return "torch-xla"
    raise UserError(f"hal.platform=neuron with hal=torch needs TorchNeuron (trn2/trn3) or PyTorch/XLA (trn1), "
                    f"neither is installed: {INSTALL['torchneuron']}; or {INSTALL['torch-xla']}; "
                    f"or use hal=jax hal.platform=neuron")


def uses_stochastic_rounding(asked: bool, bf16_weights: bool) -> bool:
    """Stochastic rounding keeps small updates of bf16 weights from vanishing; with fp32 master weights
    (autocast, FSDP2's MixedPrecisionPolicy, every backend here) the Neuron docs leave it off."""
    return asked and bf16_weights


def hooks_for(stack: str, precision: str = "bf16", cache_dir: str | None = None,
              stochastic_rounding: bool = True, instance_type: str | None = None,
              bf16_weights: bool = False) -> NeuronHooks:
    """The hook set for a stack. bf16 on Neuron means autocast with fp32 master weights (`bf16_weights`
    False: no backend here keeps bf16 weights)."""
    cache = cache_dir or os.environ.get("NEURON_COMPILE_CACHE_URL") or os.path.expanduser("~/.cache/neuron")
    sr = uses_stochastic_rounding(stochastic_rounding, bf16_weights)
    env = {"NEURON_COMPILE_CACHE_URL": cache, "NEURON_RT_STOCHASTIC_ROUNDING_EN": "1" if sr else "0"}
    if family(instance_type) in ("trn2", "trn3"):
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


def compile_choice(hooks: NeuronHooks, compile: bool, backend: str) -> tuple[bool, str]:
    """(compile?, torch.compile backend) on a stack: its own backend, or off where it takes none
    (torch-xla: Neuron has no torch.compile backend over torch_xla)."""
    if hooks.compile_backend is None:
        return False, backend
    return compile, hooks.compile_backend


def parse_cores(spec: str | None) -> list[int] | None:
    """NEURON_RT_VISIBLE_CORES ("5", "4-7", "0-3,8-11") as a list of core indices; None when unset."""
    if not spec:
        return None
    cores = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise UserError(f"NEURON_RT_VISIBLE_CORES={spec!r} is not a core or range list like 0-3,8-11") from None
        cores.extend(range(first, last + 1))
    return cores


def _host_cores(instance_type: str | None, visible: list[int] | None) -> int | None:
    """NeuronCores this host gives the job: the user's NEURON_RT_VISIBLE_CORES, else the instance's."""
    if visible is not None:
        return len(visible)
    return CORES.get(instance_type or "")


def rank_env(stack: str, instance_type: str | None, launch: LaunchEnv, visible_cores: str | None = None) -> dict:
    """NeuronCore-to-rank mapping: the environment this process sets, following each stack's documented
    pattern. `visible_cores`: NEURON_RT_VISIBLE_CORES as the user exported it (or None)."""
    visible = parse_cores(visible_cores)
    cores = _host_cores(instance_type, visible)
    if stack in ("torchneuron", "torch-xla"):
        return _torch_rank_env(stack, instance_type, launch, visible, cores)
    if stack == "jax-pjrt":
        return _jax_rank_env(instance_type, launch, visible, cores)
    raise ValueError(f"unknown Neuron stack {stack!r}")


def _torch_rank_env(stack, instance_type, launch: LaunchEnv, visible, cores) -> dict:
    """torchrun starts one process per logical NeuronCore. torch_xla maps LOCAL_RANK to a core itself
    (and raises when NEURON_RT_VISIBLE_CORES lists other than LOCAL_WORLD_SIZE cores): nothing to set.
    TorchNeuron's process uses device neuron:0, so its one core is made the only visible one."""
    n = launch.local_world_size
    if n > 1 and cores is not None and n != cores:
        where = f"NEURON_RT_VISIBLE_CORES lists {cores}" if visible is not None else f"{instance_type} has {cores}"
        raise UserError(f"torchrun --nproc-per-node {n}, but {where} NeuronCores: hal=torch runs one process per "
                        f"NeuronCore, use --nproc-per-node {cores}")
    if stack == "torch-xla":
        return {}
    core = (visible or list(range(max(n, cores or 1))))[launch.local_rank]
    return {"NEURON_RT_VISIBLE_CORES": str(core)}


def _jax_rank_env(instance_type, launch: LaunchEnv, visible, cores) -> dict:
    """One JAX process per host sees all its cores (nothing to set). Several processes each take an equal,
    contiguous block of cores, and every process is told each one's core count and its own index
    (NEURON_PJRT_PROCESSES_NUM_DEVICES, NEURON_PJRT_PROCESS_INDEX)."""
    if launch.world_size == 1:
        return {}
    if cores is None:
        raise UserError("several JAX processes on Neuron need each one's NeuronCore count: set hal.instance_type "
                        "(or $TRICHIP_INSTANCE_TYPE), or export NEURON_RT_VISIBLE_CORES for each process")
    env = {}
    per = cores
    if visible is None and launch.local_world_size > 1:
        if cores % launch.local_world_size:
            raise UserError(f"--nproc-per-node {launch.local_world_size} does not divide the {cores} NeuronCores "
                            f"of {instance_type}; use a divisor of {cores}")
        per = cores // launch.local_world_size
        first = launch.local_rank * per
        env["NEURON_RT_VISIBLE_CORES"] = str(first) if per == 1 else f"{first}-{first + per - 1}"
    env["NEURON_PJRT_PROCESSES_NUM_DEVICES"] = ",".join([str(per)] * launch.world_size)
    env["NEURON_PJRT_PROCESS_INDEX"] = str(launch.rank)
    return env


def apply_env(stack_env: dict, ranks: dict) -> None:
    """Set a stack's environment and this rank's mapping in this process (before the runtime starts). The
    stack's settings keep values the user exported; the rank mapping is derived from the user's
    NEURON_RT_VISIBLE_CORES, so it replaces it."""
    for k, v in stack_env.items():
        os.environ.setdefault(k, v)
    os.environ.update(ranks)


def plan(framework: str, probe: NeuronProbe, precision: str, neuron_cfg: dict | None, instance_type: str | None,
         launch: LaunchEnv, visible_cores: str | None = None) -> tuple[NeuronHooks, dict]:
    """(hooks, this rank's NeuronCore environment) for `hal=<framework> hal.platform=neuron`: the stack
    installed (`probe`) for the instance type, its hooks (hal.neuron config: cache_dir,
    stochastic_rounding), and the rank mapping (`visible_cores`: the user's NEURON_RT_VISIBLE_CORES)."""
    cfg = neuron_cfg or {}
    hooks = hooks_for(select_stack(framework, probe, instance_type), precision, cfg.get("cache_dir"),
                      cfg.get("stochastic_rounding", True), instance_type)
    return hooks, rank_env(hooks.stack, instance_type, launch, visible_cores)


def verdict(probe: NeuronProbe, instance_type: str | None = None) -> dict:
    """What `launch.info` says about Trainium here: {framework: the stack it would use, or why not}."""
    out = {}
    for framework in ("torch", "jax"):
        try:
            stack = select_stack(framework, probe, instance_type)
            out[framework] = {"stack": stack, **SUPPORT[stack], "families": list(SUPPORT[stack]["families"])}
        except UserError as e:
            out[framework] = {"stack": None, "why": str(e)}
    return out


def setup(framework: str, precision: str, neuron_cfg: dict | None, instance_type: str | None,
          local_rank: int = 0, local_world_size: int = 1, probe: NeuronProbe | None = None) -> NeuronHooks:
    """A backend's Neuron setup for `hal.platform=neuron`: `plan` for what is installed here (`probe`,
    detected when None) and the instance type (hal.instance_type or $TRICHIP_INSTANCE_TYPE, as the mesh
    rules take it), its environment set for this rank."""
    instance = configured_instance_type(instance_type)
    if instance in UNVERIFIED:
        logging.getLogger(__name__).warning("%s: %s", instance, UNVERIFIED[instance])
    launch = dataclasses.replace(launch_env(), local_rank=local_rank, local_world_size=local_world_size)
    hooks, ranks = plan(framework, probe or NeuronProbe.detect(), precision, neuron_cfg, instance, launch,
                        os.environ.get("NEURON_RT_VISIBLE_CORES"))
    apply_env(hooks.env, ranks)
    return hooks
