"""Asking for Trainium on a machine without Neuron (the hook decisions themselves: test_neuron_hooks.py)
and static shapes: the train step compiles once in a 50-step run that includes eval and checkpoint steps."""
import pytest

from tests.conftest import cli, compose, train


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
    assert info["trainium"]["torch"]["stack"] is None and "pip install" in info["trainium"]["torch"]["why"]
    assert not info["targets"]["tpu"]["jax"]
    r = cli("launch.info")
    assert "neuron" in r.stdout and "ready" in r.stdout and "hal=jax: no stack" in r.stdout


def test_asking_for_a_gpu_here_fails_in_one_line(tmp_path):
    for fw in ("jax", "torch"):
        r = cli("launch.train", f"hal={fw}", "hal.platform=gpu", f"run_dir={tmp_path}/{fw}")
        assert r.returncode == 2, r.stderr[-2000:]
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "hal.platform=gpu" in errors[0] and "Traceback" not in r.stderr
