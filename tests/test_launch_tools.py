"""launch.plot and launch.render, run as users run them, and the Slurm launcher preset.

Rendered manifests are checked for what Kubernetes and the operators require (apiVersion, kind, a
valid name, pod templates with image, command and resources) and for what trichip requires: the
command's overrides compose, the process count fits the instance's mesh rule, the chips asked for
match the slice or node.
"""
import json
import re
import struct
import subprocess

import pytest
import yaml

from hal import mesh as meshlib
from launch import plot, render
from tests.conftest import ROOT, cli, compose, metrics, train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


# --- launch.plot ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real 5-step JAX run, a synthetic run whose config says torch, and a bare metrics-only dir."""
    root = tmp_path_factory.mktemp("runs")
    real = root / "jax-run"
    train(real, "hal=jax", "trainer.steps=5", "trainer.seq_len=32", "trainer.eval_every=5")
    # The checkpoint's writer wins over the config: a config that says torch must not relabel it.
    (real / ".hydra").mkdir()
    (real / ".hydra" / "config.yaml").write_text("hal:\n  framework: torch\n")

    synthetic = root / "torch-run"
    (synthetic / ".hydra").mkdir(parents=True)
    (synthetic / ".hydra" / "config.yaml").write_text("hal:\n  framework: torch\n  platform: auto\n")
    rows = [dict(r, loss=r["loss"] + 0.5) for r in metrics(real)]
    (synthetic / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')

    bare = root / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 6.0 - s / 10}) + "\n"
                                                for s in range(1, 11)))
    return real, synthetic, bare


def _png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return data, width, height


def _has_colour(path, rgb, tolerance=10, min_pixels=200):   # a curve, not just a legend entry or marker
    import numpy as np
    from PIL import Image
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tolerance).sum()) >= min_pixels


def test_labels_come_from_checkpoint_then_config_then_dir_name(runs):
    real, synthetic, bare = runs
    assert plot.default_label(real) == "jax jax-run"            # latest checkpoint's writer
    assert plot.default_label(synthetic) == "torch torch-run"   # .hydra/config.yaml
    assert plot.default_label(bare) == "bare"
    assert len(plot.read_metrics(synthetic)) == 5               # the half-written last line is skipped


def test_plot_two_runs_writes_a_png_with_both_curves(runs, tmp_path):
    pytest.importorskip("matplotlib", reason="launch.plot needs matplotlib")
    real, synthetic, _ = runs
    out = tmp_path / "plots" / "loss.png"
    r = cli("launch.plot", str(real), str(synthetic), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    data, width, height = _png(out)
    assert (width, height) == (800, 500)
    assert 10_000 < len(data) < 2_000_000
    assert _has_colour(out, (31, 119, 180)) and _has_colour(out, (255, 127, 14))   # C0 and C1: both runs drawn

    one = tmp_path / "one.png"
    assert plot.main([str(real), "--out", str(one), "--metric", "grad_norm", "--labels", "jax"]) == 0
    assert _has_colour(one, (31, 119, 180)) and not _has_colour(one, (255, 127, 14))


def test_plot_errors_are_one_line(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="launch.plot needs matplotlib")
    real, _, bare = runs
    r = cli("launch.plot", str(real), str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert str(tmp_path) in _one_error_line(r.stderr) and "metrics.jsonl" in r.stderr
    assert not (tmp_path / "x.png").exists()
    for argv, needle in [([str(bare), "--metric", "eval_loss"], "trainer.eval_every"),
                         ([str(real), str(bare), "--labels", "a"], "--labels"),
                         ([str(real), "--metric", "perplexity"], "perplexity")]:
        assert plot.main(argv + ["--out", str(tmp_path / "y.png")]) == 2
        assert needle in _one_error_line(capsys.readouterr().err)


# --- launch.render -------------------------------------------------------------------------------------------

def pod_templates(manifest):
    """(pod count, pod spec) for each pod template of a JobSet or PyTorchJob."""
    if manifest["kind"] == "JobSet":
        return [(rj["replicas"] * rj["template"]["spec"]["parallelism"], rj["template"]["spec"]["template"]["spec"])
                for rj in manifest["spec"]["replicatedJobs"]]
    return [(r["replicas"], r["template"]["spec"]) for r in manifest["spec"]["pytorchReplicaSpecs"].values()]


def check_kubernetes_shape(manifest, image):
    assert (manifest["apiVersion"], manifest["kind"]) in {("jobset.x-k8s.io/v1alpha2", "JobSet"),
                                                          ("kubeflow.org/v1", "PyTorchJob")}
    name = manifest["metadata"]["name"]
    assert DNS1123_LABEL.fullmatch(name) and len(name) <= 63, name
    templates = pod_templates(manifest)
    assert templates
    for count, pod in templates:
        assert count >= 1
        assert pod.get("restartPolicy", "OnFailure") in ("Never", "OnFailure")   # Job pods may not restart Always
        volumes = {v["name"] for v in pod.get("volumes", [])}
        assert len(pod["containers"]) == 1
        for c in pod["containers"]:
            assert DNS1123_LABEL.fullmatch(c["name"])
            assert c["image"] == image
            assert c["command"] and all(isinstance(a, str) for a in c["command"])
            assert all(isinstance(e["name"], str) and ("value" in e) != ("valueFrom" in e) for e in c["env"])
            assert all(isinstance(e.get("value", ""), str) for e in c["env"])
            res = c["resources"]
            assert res["limits"] and res["requests"] == res["limits"]   # extended resources need requests == limits
            assert all(isinstance(v, int) and v > 0 for v in res["limits"].values())
            assert {m["name"] for m in c["volumeMounts"]} <= volumes
            assert all(len(p["name"]) <= 15 for p in c.get("ports", []))   # IANA service names
    if manifest["kind"] == "PyTorchJob":
        specs = manifest["spec"]["pytorchReplicaSpecs"]
        assert specs["Master"]["replicas"] == 1
        assert all(c["name"] == "pytorch" for _, pod in templates for c in pod["containers"])
    return templates


def train_overrides(command):
    return command[command.index("launch.train") + 1:]


def _render(target, *args, image="registry.example/trichip:1"):
    r = cli("launch.render", target, "--image", image, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("# rendered by: python -m launch.render ")
    return yaml.safe_load(r.stdout), image


def test_gke_tpu_jobset(tmp_path):
    manifest, image = _render("gke-tpu", "--tpu", "v5p", "--chips", "16", "--", "model=small", "trainer.steps=1000")
    [(hosts, pod)] = check_kubernetes_shape(manifest, image)
    container = pod["containers"][0]
    per_host = container["resources"]["limits"]["google.com/tpu"]
    assert (per_host, hosts) == (4, 16 // 4)
    selector = pod["nodeSelector"]
    assert selector["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5p-slice"
    topology = [int(d) for d in selector["cloud.google.com/gke-tpu-topology"].split("x")]
    assert len(topology) == 3 and topology[0] * topology[1] * topology[2] == 16
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["completions"] == hosts and job["completionMode"] == "Indexed"
    env = {e["name"]: e for e in container["env"]}
    assert len(env["TPU_WORKER_HOSTNAMES"]["value"].split(",")) == hosts
    assert "job-completion-index" in env["TPU_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"]

    assert container["command"][:3] == ["python", "-m", "launch.train"]
    cfg = compose(train_overrides(container["command"]))
    assert cfg["hal"]["framework"] == "jax" and cfg["hal"]["distributed"] is True
    assert cfg["hal"]["instance_type"] == "tpu-v5p-32"   # Google's accelerator type: 16 chips = 32 TensorCores
    assert (cfg["model"]["name"], cfg["trainer"]["steps"]) == ("small", 1000)
    assert f"run_dir=/runs/{manifest['metadata']['name']}" in container["command"]
    assert meshlib.choose(None, "auto", cfg["hal"]["instance_type"], 16)[1].startswith("mesh rule")


@pytest.mark.parametrize("tpu,chips,topology,per_host", [
    ("v5p", 4, "2x2x1", 4), ("v5p", 8, "2x2x2", 4), ("v5p", 32, "2x4x4", 4), ("v5p", 512, "8x8x8", 4),
    ("v6e", 1, "1x1", 1), ("v6e", 8, "2x4", 8), ("v6e", 16, "4x4", 4), ("v6e", 256, "16x16", 4)])
def test_tpu_slice_shapes(tpu, chips, topology, per_host):
    assert render.tpu_topology(tpu, chips) == topology
    assert render.chips_per_host(tpu, chips) == per_host


@pytest.mark.parametrize("instance,nodes", [("trn1.32xlarge", 2), ("trn2.48xlarge", 1)])
def test_eks_trainium_pytorchjob(instance, nodes):
    manifest, image = _render("eks-trainium", "--instance", instance, "--nodes", str(nodes), "--", "model=llama3.2-1b")
    templates = check_kubernetes_shape(manifest, image)
    assert sum(count for count, _ in templates) == nodes
    cores = {"trn1.32xlarge": 32, "trn2.48xlarge": 64}[instance]
    for _, pod in templates:
        assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": instance}
        c = pod["containers"][0]
        assert c["resources"]["limits"]["aws.amazon.com/neuron"] == 16          # Trainium devices per node
        assert c["resources"]["limits"]["vpc.amazonaws.com/efa"] >= 8
        cmd = c["command"]
        assert cmd[0] == "torchrun"
        assert cmd[cmd.index("--nnodes") + 1] == str(nodes)
        assert cmd[cmd.index("--nproc-per-node") + 1] == str(cores)             # one process per NeuronCore
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["NEURON_RT_NUM_CORES"] == "1" and env["FI_PROVIDER"] == "efa"
        assert env["NEURON_COMPILE_CACHE_URL"] == "/cache/neuron"
        assert "/cache" in {m["mountPath"] for m in c["volumeMounts"]}
        if instance == "trn2.48xlarge":
            assert env["NEURON_LOGICAL_NC_CONFIG"] == "2" and "--logical-nc-config=2" in env["NEURON_CC_FLAGS"]
        cfg = compose(train_overrides(cmd))
        assert (cfg["hal"]["framework"], cfg["hal"]["platform"], cfg["hal"]["instance_type"]) == \
               ("torch", "neuron", instance)
        assert cfg["model"]["name"] == "llama3.2-1b"
        # the instance's mesh rule covers every process of the job
        meshlib.resolve(meshlib.rule_for(instance), nodes * cores)


@pytest.mark.parametrize("cloud,instance,selector", [
    ("eks", "p5.48xlarge", {"node.kubernetes.io/instance-type": "p5.48xlarge"}),
    ("gke", "a3-highgpu-8g", {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"})])
def test_gpu_pytorchjob(cloud, instance, selector):
    manifest, image = _render("gpu", "--cloud", cloud, "--nodes", "2", "--", "trainer.precision=bf16")
    templates = check_kubernetes_shape(manifest, image)
    assert [count for count, _ in templates] == [1, 1]
    for _, pod in templates:
        assert pod["nodeSelector"] == selector
        c = pod["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert ("vpc.amazonaws.com/efa" in c["resources"]["limits"]) == (cloud == "eks")
        cmd = c["command"]
        assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--nproc-per-node") + 1] == "8"
        assert cmd[cmd.index("--node-rank") + 1] == "$(RANK)"    # set per pod by the training operator
        cfg = compose(train_overrides(cmd))
        assert (cfg["hal"]["framework"], cfg["hal"]["platform"], cfg["hal"]["instance_type"]) == \
               ("torch", "gpu", instance)
        assert cfg["trainer"]["precision"] == "bf16"
        assert meshlib.resolve(meshlib.rule_for(instance), 16) == {"data": 2, "fsdp": 8, "tensor": 1}


def test_render_out_dir_and_name(tmp_path):
    r = cli("launch.render", "eks-trainium", "--image", "img", "--name", "my-run", "--out", str(tmp_path),
            "--", "run_dir=/runs/shared/my-run")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = yaml.safe_load((tmp_path / "my-run.yaml").read_text())
    assert manifest["metadata"]["name"] == "my-run"
    cmd = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert [o for o in cmd if o.startswith("run_dir=")] == ["run_dir=/runs/shared/my-run"]


def test_render_bad_override_is_one_line_exit_2():
    r = cli("launch.render", "gke-tpu", "--image", "img", "--chips", "8", "--", "trainer.stepz=3")
    assert r.returncode == 2 and r.stdout == ""
    line = _one_error_line(r.stderr)
    assert "trainer.stepz" in line and "steps" in line     # names the bad key and the keys there are


@pytest.mark.parametrize("argv,needle", [
    (["gke-tpu", "--image", "i", "--chips", "8", "--", "model=huge"], "model/huge"),
    (["gke-tpu", "--image", "i", "--chips", "8", "--", "hal=torch"], "hal=jax"),
    (["gke-tpu", "--image", "i", "--chips", "8", "--", "data=tokens"], "data.path"),
    (["gke-tpu", "--image", "i", "--chips", "6"], "--topology"),
    (["gke-tpu", "--image", "i", "--chips", "8", "--topology", "4x4x4"], "64 chips"),
    (["gke-tpu", "--chips", "8"], "--image"),
    (["gpu", "--image", "i", "--cloud", "gke", "--instance", "p5.48xlarge"], "a3-highgpu-8g"),
    (["eks-trainium", "--image", "i", "--instance", "trn3.big"], "trn1.32xlarge"),
    (["eks-trainium", "--image", "i", "--name", "Trichip_Run"], "--name"),
    (["eks-trainium", "--image", "i", "--", "trainer.steps"], "key=value"),
])
def test_render_user_errors(argv, needle, capsys):
    assert render.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and needle in _one_error_line(captured.err)


# --- Slurm: the Hydra launcher preset ------------------------------------------------------------------------

def _slurm_launcher(*overrides):
    from configs.schema import compose_config
    return compose_config(["hydra/launcher=slurm_gpu", *overrides], return_hydra_config=True)


def test_slurm_preset_composes_and_instantiates(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    from hydra.utils import instantiate
    cfg = _slurm_launcher("hydra.launcher.nodes=4", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}",
                          "hal=torch", "hal.platform=gpu", "hal.instance_type=p5.48xlarge")
    launcher = instantiate(cfg.hydra.launcher)   # the plugin's own class: checks every key; submits nothing
    assert type(launcher).__name__ == "SlurmLauncher"
    p = launcher.params
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"], p["partition"]) == (4, 8, 8, "gpu")
    assert p["submitit_folder"] == f"{tmp_path}/.submitit/%j"
    assert cfg.hal.framework == "torch"


def test_slurm_setup_gives_each_task_torchrun_variables(tmp_path):
    """Run the preset's setup lines as the batch script would (a stand-in scontrol), then its task
    prolog as srun would for task 11 (node 1, local 3): the variables trichip reads come out right."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    from omegaconf import OmegaConf
    cfg = _slurm_launcher(f"hydra.sweep.dir={tmp_path / 'sweep'}")
    setup = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["setup"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a\\ngpu-b\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    script = "set -e\n" + "\n".join(setup) + '\necho "$MASTER_ADDR $MASTER_PORT $WORLD_SIZE $SLURM_TASK_PROLOG"\n'
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "424242", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_NTASKS": "16"}
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    addr, port, world, prolog = r.stdout.split()
    assert (addr, world) == ("gpu-a", "16") and 20000 <= int(port) < 40000
    assert prolog == str(tmp_path / "sweep" / ".submitit" / "task_env_424242.sh")
    task = subprocess.run([prolog], env={"SLURM_PROCID": "11", "SLURM_LOCALID": "3", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert task.returncode == 0, task.stderr
    assert task.stdout.splitlines() == ["export RANK=11", "export LOCAL_RANK=3"]
