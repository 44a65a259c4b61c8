"""Neuron hooks (decisions tested directly; the Neuron stacks cannot be installed here) and static
shapes: the train step compiles once in a 50-step run that includes eval and checkpoint steps."""
import os

import pytest

from hal import UserError
from hal.neuron import CORES, NeuronProbe, apply_env, hooks_for, rank_env, select_stack
from tests.conftest import cli, compose, train


def test_stack_selection():
    assert select_stack("torch", NeuronProbe(torch_neuron_device=True, torch_xla=True)) == "torchneuron"
    assert select_stack("torch", NeuronProbe(torch_xla=True)) == "torch-xla"
    assert select_stack("jax", NeuronProbe(jax_plugin=True)) == "jax-pjrt"
    with pytest.raises(UserError, match="torch-neuronx"):
        select_stack("torch", NeuronProbe())
    with pytest.raises(UserError, match="PJRT plugin"):
        select_stack("jax", NeuronProbe(torch_neuron_device=True))


def test_this_machine_has_no_neuron_stack():
    """The PyPI names are placeholders: detection must not mistake them for the real thing."""
    probe = NeuronProbe.detect()
    assert not probe.torch_neuron_device and not probe.torch_xla and not probe.jax_plugin


def test_hook_sets():
    native = hooks_for("torchneuron", "bf16", "/c", instance_type="trn2.48xlarge")
    assert (native.device, native.process_group_backend, native.compile_backend) == ("neuron", "neuron", "neuron")
    assert native.step_barrier is None and native.supports_fsdp2 and native.autocast_device == "neuron"
    assert native.env["NEURON_COMPILE_CACHE_URL"] == "/c" and native.env["NEURON_LOGICAL_NC_CONFIG"] == "2"
    xla = hooks_for("torch-xla", "bf16", "/c", instance_type="trn1.32xlarge")
    assert (xla.device, xla.process_group_backend, xla.step_barrier, xla.optimizer_step) == \
        ("xla", "xla", "torch_xla.sync", "xm.optimizer_step")
    assert not xla.supports_fsdp2 and xla.env["PJRT_DEVICE"] == "NEURON"
    assert "--auto-cast=none" in xla.env["NEURON_CC_FLAGS"] and "neuron_parallel_compile" in xla.precompile_command
    assert "NEURON_LOGICAL_NC_CONFIG" not in xla.env
    jax = hooks_for("jax-pjrt", "fp32", "/c")
    assert jax.env["JAX_PLATFORMS"] == "neuron" and jax.autocast_device is None
    assert hooks_for("torchneuron", "bf16", stochastic_rounding=False).env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"


@pytest.mark.parametrize("instance,nproc,rank,visible", [
    ("trn1.32xlarge", 32, 5, "5"), ("trn1.32xlarge", 16, 3, "6-7"), ("trn2.48xlarge", 64, 63, "63"),
    ("trn2.48xlarge", 16, 1, "4-7")])
def test_neuroncore_to_rank_mapping(instance, nproc, rank, visible):
    env = rank_env(rank, nproc, instance)
    assert env["NEURON_RT_VISIBLE_CORES"] == visible
    assert int(env["NEURON_RT_NUM_CORES"]) == CORES[instance] // nproc


def test_mapping_must_divide_the_cores():
    with pytest.raises(UserError, match="does not divide the 32 NeuronCores"):
        rank_env(0, 5, "trn1.32xlarge")


def test_apply_env_keeps_what_the_user_exported(monkeypatch):
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", "s3://my-bucket/cache")
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    env = apply_env(hooks_for("torchneuron", "bf16", "/local"), 2, 32, "trn1.32xlarge")
    assert os.environ["NEURON_COMPILE_CACHE_URL"] == "s3://my-bucket/cache"
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == env["NEURON_RT_VISIBLE_CORES"] == "2"


@pytest.mark.parametrize("args", [["hal=trainium"], ["hal=torch", "hal.platform=neuron"],
                                  ["hal=jax", "hal.platform=neuron"]])
def test_asking_for_neuron_here_fails_in_one_line(tmp_path, args):
    r = cli("launch.train", *args, f"run_dir={tmp_path}/run")
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "pip install" in errors[0] and "Traceback" not in r.stderr


def test_trainium_config_picks_mesh_rule():
    cfg = compose(["hal=trainium", "hal.instance_type=trn2.48xlarge"])
    assert cfg["hal"]["platform"] == "neuron" and cfg["hal"]["compile_backend"] == "neuron"
    from hal.mesh import choose
    assert choose(cfg["hal"]["mesh"], cfg["hal"]["mesh_rule"], "trn2.48xlarge", 64)[0] == \
        {"data": 1, "fsdp": 16, "tensor": 4}


STATIC = ["trainer.steps=50", "trainer.eval_every=10", "trainer.checkpoint_every=10", "trainer.global_batch=8",
          "trainer.micro_batch=4", "trainer.seq_len=32", "trainer.log_every=25"]


def test_jax_train_step_compiles_once_in_50_steps(tmp_path):
    summary = train(tmp_path / "run", "hal=jax", *STATIC)
    assert summary["compilations"] == {"train_step": 1, "eval": 1}


def test_torch_compile_does_not_recompile_in_50_steps(tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    def fresh():
        torch._dynamo.reset()
        counters.clear()
    fresh()
    # after 10 steps (the first eval and checkpoint included) the graphs exist; 50 steps make no more
    first = train(tmp_path / "a", "hal=torch", "hal.compile=true", "hal.compile_backend=aot_eager", *STATIC,
                  "trainer.steps=10")["compilations"]["graphs"]
    fresh()
    full = train(tmp_path / "b", "hal=torch", "hal.compile=true", "hal.compile_backend=aot_eager", *STATIC
                 )["compilations"]["graphs"]
    assert first >= 1 and full == first


def test_precompile_trial_run_writes_nothing(tmp_path):
    cache = tmp_path / "xla-cache"
    summary = train(tmp_path / "run", "hal=jax", "trainer.precompile=true", f"hal.compile_cache_dir={cache}",
                    "trainer.seq_len=32")
    assert summary["precompile"] and summary["compilations"]["train_step"] == 1
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert any(cache.iterdir())           # the persistent compile cache was filled


def test_info_lists_targets():
    import json
    r = cli("launch.info", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["targets"]["cpu"]["jax"] and info["targets"]["cpu"]["torch"]
    assert not info["targets"]["neuron"]["torch"] and "torch-neuronx" in info["targets"]["neuron"]["install"]
    assert not info["targets"]["tpu"]["jax"]
    r = cli("launch.info")
    assert "neuron" in r.stdout and "ready" in r.stdout


def test_asking_for_a_gpu_here_fails_in_one_line(tmp_path):
    for fw in ("jax", "torch"):
        r = cli("launch.train", f"hal={fw}", "hal.platform=gpu", f"run_dir={tmp_path}/{fw}")
        assert r.returncode == 2, r.stderr[-2000:]
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "hal.platform=gpu" in errors[0] and "Traceback" not in r.stderr
