"""The Neuron hooks' decisions, each a function of what is installed, the instance type and the launch
environment, checked without Trainium (the Neuron packages cannot be installed here); and the host side
of the torch-xla stack (host collectives beside a default group with no CPU backend, checkpoints of a
replicated state without FSDP2) run on real gloo processes."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from hal import UserError
from hal.distributed import LaunchEnv, free_port
from hal.neuron import (CORES, INSTALL, SUPPORT, UNVERIFIED, NeuronProbe, OptimizerStep, compile_choice,
                        hooks_for, jax_install, parse_cores, plan, rank_env, select_stack, setup, verdict)
from tests.conftest import ROOT

TORCHNEURON = NeuronProbe(torch_neuron_device=True)
TORCH_XLA = NeuronProbe(torch_xla=True)
JAX = NeuronProbe(jax_plugin=True)


def torchrun(nproc, local_rank=0, nodes=1, node=0):
    return LaunchEnv(world_size=nproc * nodes, rank=node * nproc + local_rank, local_rank=local_rank,
                     local_world_size=nproc)


# -- which stack, and how to install it --------------------------------------------------------------------

def test_stack_selection():
    assert select_stack("torch", NeuronProbe(torch_neuron_device=True, torch_xla=True), "trn2.48xlarge") == \
        "torchneuron"
    assert select_stack("torch", TORCH_XLA, "trn1.32xlarge") == "torch-xla"
    assert select_stack("jax", JAX, "trn1.32xlarge") == "jax-pjrt"
    with pytest.raises(UserError, match="torch-neuronx"):
        select_stack("torch", NeuronProbe())
    with pytest.raises(UserError, match="PJRT plugin"):
        select_stack("jax", TORCHNEURON)


@pytest.mark.parametrize("instance", ["trn1.2xlarge", "trn1.32xlarge", "trn1n.32xlarge"])
def test_torchneuron_on_trn1_is_refused_in_one_line(instance):
    with pytest.raises(UserError) as e:
        select_stack("torch", TORCHNEURON, instance)
    message = str(e.value)
    assert "\n" not in message and f"trn2/trn3 only, not {instance}" in message
    assert "hal=jax hal.platform=neuron" in message and "torch-neuronx==2.9.0.2.13.26312" in message


def test_this_machine_has_no_neuron_stack():
    """The PyPI names are placeholders: detection must not mistake them for the real thing."""
    probe = NeuronProbe.detect()
    assert not probe.torch_neuron_device and not probe.torch_xla and not probe.jax_plugin


def test_install_lines_are_the_documented_ones():
    native = INSTALL["torchneuron"]
    for part in ("'torch-neuronx==2.13.*'", "'neuronx-cc==2.*'", " nki ", "pip.repos.neuron.amazonaws.com",
                 "--extra-index-url https://download.pytorch.org/whl/cpu", "Neuron >= 2.33", "trn2/trn3"):
        assert part in native
    # Neuron 2.29.1, the last release with PyTorch/XLA training: its exact torch-neuronx and neuronx-cc
    assert "torch-neuronx==2.9.0.2.13.26312 neuronx-cc==2.24.8799.0" in INSTALL["torch-xla"]
    assert "'jax-neuronx[stable]'" in INSTALL["jax-pjrt"]


@pytest.mark.parametrize("version,libneuronxla,note", [("0.10.0", "3.*", False), ("0.7.0", "3.*", False),
                                                       ("0.6.2", "2.*", False), ("0.10.2", "3.*", True)])
def test_jax_install_takes_the_libneuronxla_major_jax_needs(version, libneuronxla, note):
    line = jax_install(version)
    assert f"'libneuronxla=={libneuronxla}'" in line and ("up to 0.10.0" in line) == note
    assert jax_install(None) == INSTALL["jax-pjrt"]


# -- the hook sets ---------------------------------------------------------------------------------------------

def test_hook_sets():
    native = hooks_for("torchneuron", "bf16", "/c", instance_type="trn2.48xlarge")
    assert (native.device, native.process_group_backend, native.compile_backend) == ("neuron", "neuron", "neuron")
    assert native.step_barrier is None and native.supports_fsdp2 and native.autocast_device == "neuron"
    assert native.env["NEURON_COMPILE_CACHE_URL"] == "/c" and native.env["NEURON_LOGICAL_NC_CONFIG"] == "2"
    xla = hooks_for("torch-xla", "bf16", "/c", instance_type="trn1.32xlarge")
    assert (xla.device, xla.process_group_backend, xla.step_barrier, xla.optimizer_step) == \
        ("xla", "xla", "torch_xla.sync", OptimizerStep.XM)
    assert not xla.supports_fsdp2 and xla.compile_backend is None and xla.env["PJRT_DEVICE"] == "NEURON"
    assert "--auto-cast=none" in xla.env["NEURON_CC_FLAGS"] and "neuron_parallel_compile" in xla.precompile_command
    assert "NEURON_LOGICAL_NC_CONFIG" not in xla.env
    jax = hooks_for("jax-pjrt", "fp32", "/c")
    assert jax.env["JAX_PLATFORMS"] == "neuron" and jax.autocast_device is None


def test_compile_is_off_on_torch_xla_and_neuron_on_torchneuron():
    assert compile_choice(hooks_for("torch-xla", instance_type="trn1.32xlarge"), True, "neuron") == (False, "neuron")
    assert compile_choice(hooks_for("torchneuron"), True, "inductor") == (True, "neuron")
    assert compile_choice(hooks_for("torchneuron"), False, "inductor") == (False, "neuron")


def test_stochastic_rounding_only_for_bf16_weights():
    """Every backend keeps fp32 master weights (autocast or FSDP2's MixedPrecisionPolicy): rounding to nearest."""
    for stack in ("torchneuron", "torch-xla", "jax-pjrt"):
        assert hooks_for(stack, "bf16").env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"
        assert hooks_for(stack, "bf16", bf16_weights=True).env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "1"
        assert hooks_for(stack, "bf16", stochastic_rounding=False, bf16_weights=True
                         ).env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"


# -- NeuronCore-to-rank mapping --------------------------------------------------------------------------------

def test_parse_visible_cores():
    assert parse_cores("5") == [5] and parse_cores("4-7") == [4, 5, 6, 7] and parse_cores("0-1,8-9") == [0, 1, 8, 9]
    assert parse_cores(None) is None
    with pytest.raises(UserError, match="NEURON_RT_VISIBLE_CORES"):
        parse_cores("a-b")


@pytest.mark.parametrize("instance", ["trn1.32xlarge", "trn2.48xlarge"])
def test_torch_xla_maps_cores_itself(instance):
    """torch_xla sets NEURON_RT_VISIBLE_CORES from LOCAL_RANK (and remaps a list of LOCAL_WORLD_SIZE cores)."""
    n = CORES[instance]
    assert rank_env("torch-xla", instance, torchrun(n, n - 1)) == {}
    assert rank_env("torch-xla", instance, torchrun(4, 1), visible_cores="8-11") == {}
    assert rank_env("torch-xla", instance, LaunchEnv()) == {}          # one process: one core


def test_torchneuron_gives_each_rank_one_core_as_device_0():
    assert rank_env("torchneuron", "trn2.48xlarge", torchrun(64, 63)) == {"NEURON_RT_VISIBLE_CORES": "63"}
    assert rank_env("torchneuron", "trn2.48xlarge", torchrun(64, 5, nodes=2, node=1)) == \
        {"NEURON_RT_VISIBLE_CORES": "5"}
    assert rank_env("torchneuron", "trn2.48xlarge", torchrun(4, 2), visible_cores="8-11") == \
        {"NEURON_RT_VISIBLE_CORES": "10"}
    assert rank_env("torchneuron", None, LaunchEnv()) == {"NEURON_RT_VISIBLE_CORES": "0"}


@pytest.mark.parametrize("stack", ["torchneuron", "torch-xla"])
def test_torch_refuses_a_process_count_other_than_the_cores(stack):
    with pytest.raises(UserError) as e:
        rank_env(stack, "trn1.32xlarge", torchrun(16, 3))
    assert "\n" not in str(e.value) and "use --nproc-per-node 32" in str(e.value)
    with pytest.raises(UserError, match="NEURON_RT_VISIBLE_CORES lists 4 NeuronCores"):
        rank_env(stack, "trn2.48xlarge", torchrun(8, 0), visible_cores="0-3")


def test_one_jax_process_sees_every_core():
    """No instance type, one process: nothing is pinned (all of the host's cores are the process's)."""
    assert rank_env("jax-pjrt", None, LaunchEnv()) == {}
    assert rank_env("jax-pjrt", "trn1.32xlarge", LaunchEnv()) == {}


def test_jax_processes_take_core_blocks_and_tell_pjrt():
    env = rank_env("jax-pjrt", "trn2.48xlarge", torchrun(16, 1, nodes=2, node=1))
    assert env == {"NEURON_RT_VISIBLE_CORES": "4-7", "NEURON_PJRT_PROCESSES_NUM_DEVICES": ",".join(["4"] * 32),
                   "NEURON_PJRT_PROCESS_INDEX": "17"}
    one_per_host = rank_env("jax-pjrt", "trn1.32xlarge", torchrun(1, 0, nodes=4, node=2))
    assert one_per_host == {"NEURON_PJRT_PROCESSES_NUM_DEVICES": "32,32,32,32", "NEURON_PJRT_PROCESS_INDEX": "2"}
    own = rank_env("jax-pjrt", None, torchrun(2, 1), visible_cores="8-15")
    assert own == {"NEURON_PJRT_PROCESSES_NUM_DEVICES": "8,8", "NEURON_PJRT_PROCESS_INDEX": "1"}


def test_jax_processes_need_a_core_count():
    with pytest.raises(UserError, match="set hal.instance_type"):
        rank_env("jax-pjrt", None, torchrun(2, 0))
    with pytest.raises(UserError, match="does not divide the 32 NeuronCores"):
        rank_env("jax-pjrt", "trn1.32xlarge", torchrun(5, 0))


# -- setup: the instance type where the mesh rules take it, the environment set --------------------------

@pytest.fixture
def environ(monkeypatch):
    """A copy of the environment that setup may write to."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEURON_", "TRICHIP_", "PJRT_"))}
    monkeypatch.setattr(os, "environ", env)
    return env


def test_setup_takes_the_instance_type_from_the_environment(environ):
    environ["TRICHIP_INSTANCE_TYPE"] = "trn1.32xlarge"
    with pytest.raises(UserError, match="not trn1.32xlarge"):
        setup("torch", "bf16", None, None, probe=TORCHNEURON)
    environ["TRICHIP_INSTANCE_TYPE"] = "trn2.48xlarge"
    hooks = setup("torch", "bf16", None, None, local_rank=3, local_world_size=64, probe=TORCHNEURON)
    assert hooks.stack == "torchneuron" and environ["NEURON_LOGICAL_NC_CONFIG"] == "2"
    assert environ["NEURON_RT_VISIBLE_CORES"] == "3"


def test_setup_keeps_what_the_user_exported_and_remaps_their_cores(environ):
    environ.update(NEURON_COMPILE_CACHE_URL="s3://my-bucket/cache", NEURON_RT_VISIBLE_CORES="32-63")
    setup("torch", "bf16", {"cache_dir": "/local"}, "trn2.48xlarge", 2, 32, probe=TORCHNEURON)
    assert environ["NEURON_COMPILE_CACHE_URL"] == "s3://my-bucket/cache"
    assert environ["NEURON_RT_VISIBLE_CORES"] == "34"


def test_trn3_is_marked_unverified(environ, caplog):
    assert "trn3.48xlarge" in UNVERIFIED
    with caplog.at_level(logging.WARNING, logger="hal.neuron"):
        setup("jax", "bf16", None, "trn3.48xlarge", probe=JAX)
    assert "UltraServers" in caplog.text


def test_plan_is_the_decision_setup_acts_on():
    hooks, ranks = plan("jax", JAX, "bf16", {"stochastic_rounding": False}, "trn2.48xlarge", torchrun(16, 2))
    assert hooks.stack == "jax-pjrt" and ranks["NEURON_RT_VISIBLE_CORES"] == "8-11"


def test_verdict_names_each_stack_and_what_never_ran():
    v = verdict(NeuronProbe(torch_neuron_device=True, jax_plugin=True), "trn2.48xlarge")
    assert v["torch"]["stack"] == "torchneuron" and v["torch"]["families"] == ["trn2", "trn3"]
    assert v["jax"]["never_ran"] == SUPPORT["jax-pjrt"]["never_ran"]
    assert verdict(NeuronProbe(torch_neuron_device=True), "trn1.32xlarge")["torch"]["stack"] is None


# -- torch processes: JAX on the host, clipping with the norm on the device --------------------------------------

def tiny_torch_backend():
    from hal.base import OptimizerSpec
    from hal.torch_backend import TorchBackend
    from models.spec import LlamaConfig
    model = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return TorchBackend(model, OptimizerSpec(), platform="cpu")


@pytest.mark.slow
def test_a_torch_process_pins_jax_to_the_cpu():
    code = ("from tests.test_neuron_hooks import tiny_torch_backend; import os; tiny_torch_backend(); "
            "import jax; print(os.environ['JAX_PLATFORMS'], jax.config.jax_platforms)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["cpu", "cpu"]


@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_clipping_keeps_the_norm_on_the_device_and_matches_the_formula(scale):
    import torch
    backend = tiny_torch_backend()
    rng = np.random.default_rng(1)
    grads = [torch.from_numpy(rng.standard_normal(tuple(p.shape), np.float32) * scale)
             for p in backend.net.parameters()]
    before = [g.clone() for g in grads]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    backend._clip(grads, norm)
    max_norm = backend.optim.max_grad_norm
    over = float(norm) > max_norm
    for g, b in zip(grads, before):
        want = b / float(norm) * max_norm if over else b
        assert torch.equal(g, want)
    assert over == (scale == 10.0)


# -- the torch-xla stack's host side on real gloo processes ------------------------------------------------------

@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    """Two gloo processes: a default group with no CPU backend, host collectives, and a replicated state
    (no FSDP2) written and read back through hal.fsdp_store."""
    tmp = tmp_path_factory.mktemp("neuron-host")
    port, ckpt = str(free_port()), str(tmp / "ckpt")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.neuron_host_worker", str(r), port, ckpt,
                               str(tmp / f"r{r}.json")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return ckpt, [json.loads((tmp / f"r{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_host_collectives_use_a_gloo_group_when_the_default_has_no_cpu_backend(gloo_run):
    _, results = gloo_run
    for r in results:
        assert "No backend type associated with device type cpu" in r["default_refuses"]
        assert r["sum"] == [1, 10]          # (2**63 + 0) + (2**63 + 1) wraps to 1; 5 + 5
        assert r["shared"] == {"from": 0}


@pytest.mark.slow
def test_checkpoint_without_fsdp2_writes_and_reads_what_each_rank_holds(gloo_run):
    from hal import store
    ckpt, results = gloo_run
    for r in results:
        assert r["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1} and r["parts_whole"]
        assert r["read_back"] == r["written"] and r["count"] == 7
    names = list(results[0]["written"])
    alone = store.read_tensors(ckpt, names)
    for n in names:
        np.testing.assert_array_equal(alone[n], np.asarray(results[0]["written"][n], np.float32))
    digests = {n: str(v["digest"]) for n, v in store.summarize(alone).items()}
    assert all({n: r["digests"][n] for n in names} == digests for r in results)


def test_torch_without_fsdp2_is_data_parallel_only():
    from hal.torch_backend import _torch_mesh
    sizes, source = _torch_mesh(None, "auto", "trn1.32xlarge", 32, fsdp2=False)
    assert sizes == {"data": 32, "fsdp": 1, "tensor": 1} and "no FSDP2" in source
    with pytest.raises(UserError, match="hal.mesh.fsdp=1"):
        _torch_mesh({"fsdp": 4}, "auto", None, 4, fsdp2=False)
    assert _torch_mesh(None, "auto", "trn1.32xlarge", 32)[0] == {"data": 1, "fsdp": 16, "tensor": 2}
