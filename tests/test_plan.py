"""launch.plan: the planner's FLOPs, memory, mesh, ranking and errors; the SkyPilot task; --measure."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs.schema import TrainerConfig
from hal import mesh as meshlib
from launch import planner
from models.errors import UserError
from models.spec import SIZES, flops_per_token, num_params

ROOT = Path(__file__).resolve().parents[1]
CATALOG = planner.load_catalog()
CHUNK = TrainerConfig.loss_chunk


def settings(**kw):
    base = dict(seq_len=2048, global_batch=256, micro_batch=None, precision="bf16", remat="auto", overlap=0.75, mfu={})
    return planner.Settings(**{**base, **kw})


def plan(cmd, tmp_path, *overrides):
    return subprocess.run([sys.executable, "-m", "launch.plan", *cmd, f"run_dir={tmp_path}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_flops_are_the_models():
    cfg = SIZES["llama3.1-8b"]
    row = planner.plan_target(cfg, planner.parse_target("p5.48xlarge", CATALOG), CATALOG, settings())
    assert row["flops_per_token"] == flops_per_token(cfg, 2048)


@pytest.mark.parametrize("name,chips,devices", [("tpu-v5p-128", 64, 64), ("v5p-128", 64, 64), ("64xv5p", 64, 64),
                                                ("v5litepod-16", 16, 16), ("tpu-v6e-16", 16, 16),
                                                ("16xtrn2", 16, 64), ("trn1.32xlarge", 16, 32), ("16xh100", 16, 16)])
def test_target_names(name, chips, devices):
    t = planner.parse_target(name, CATALOG)
    row = planner.plan_target(SIZES["small"], t, CATALOG, settings(global_batch=64))
    assert (row["chips"], row["devices"]) == (chips, devices)
    assert row["mesh"]["data"] * row["mesh"]["fsdp"] * row["mesh"]["tensor"] == devices


def test_mesh_is_the_platform_rule():
    row = planner.plan_target(SIZES["small"], planner.parse_target("16xh100", CATALOG), CATALOG, settings())
    assert row["mesh"] == meshlib.choose(None, "auto", "p5.48xlarge", 16)[0] == {"data": 2, "fsdp": 8, "tensor": 1}
    trn = planner.plan_target(SIZES["small"], planner.parse_target("trn2.48xlarge", CATALOG), CATALOG, settings())
    assert trn["mesh"] == {"data": 1, "fsdp": 16, "tensor": 4} and trn["mesh_source"] == "mesh rule for trn2.48xlarge"


def test_memory_shrinks_with_fsdp_degree():
    cfg = SIZES["llama3.2-1b"]
    totals = []
    for n in (1, 2, 4, 8):
        mesh = meshlib.choose(None, "auto", "tpu-v5p-16", n)[0]
        parts = planner.memory(cfg, mesh, "jax", 8, 2048, "bf16", False, "materialized")
        assert parts["params+moments"] == pytest.approx(num_params(cfg) * 12 / n, rel=0.01)
        totals.append(sum(parts.values()))
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0] / 3


def test_remat_assumption_is_stated():
    notes = planner.assumptions(CATALOG, settings(), {"h100"})
    assert any("activation checkpointing" in n and "optimization barriers" in n for n in notes)


def test_gpu_measurements_within_15_percent():
    """bench/RESULTS_H200.md: 1.24B, bf16, micro-batch 8, seq 2048 on one H200: JAX 73.9 GB, torch 83.7 GB,
    measured with the loss through the whole logits (loss_chunk=0)."""
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    for framework, measured in (("jax", 73.9e9), ("torch", 83.7e9)):
        parts = planner.memory(SIZES["llama3.2-1b"], one, framework, 8, 2048, "bf16", False, "flash", loss_chunk=0)
        assert abs(sum(parts.values()) / measured - 1) < 0.15, framework


@pytest.mark.slow
def test_nothing_fits_names_smallest_target(tmp_path):
    huge = ["model.num_hidden_layers=400", "model.hidden_size=8192", "model.intermediate_size=28672",
            "model.num_attention_heads=64", "model.num_key_value_heads=8"]     # 320B parameters
    from launch.plan import run
    from configs.schema import to_plain
    from hydra import compose, initialize_config_module
    with initialize_config_module("configs", version_base="1.3"):
        cfg = to_plain(compose("plan", overrides=["model=llama3.1-8b", *huge, "plan.targets=[1xh100,8xh100]",
                                                  "plan.chart=false", "plan.global_batch=64", "plan.seq_len=512"]))
    rows = run(cfg, tmp_path)
    assert not any(r["fits"] for r in rows)
    assert all(r["tokens_per_s"] is None and r["usd_per_1m_tokens"] is None for r in rows)
    assert rows[0]["smallest_fitting_target"]
    assert planner.parse_target(rows[0]["smallest_fitting_target"], CATALOG)


def test_missing_price_is_a_gap():
    row = planner.plan_target(SIZES["small"], planner.parse_target("p5e.48xlarge", CATALOG), CATALOG, settings())
    assert row["fits"] and row["price"] is None and row["usd_per_1m_tokens"] is None and row["tokens_per_s"]


def test_ranking_puts_cheapest_meeting_first():
    cfg = SIZES["llama3.2-1b"]
    rows = [planner.plan_target(cfg, planner.parse_target(t, CATALOG), CATALOG, settings())
            for t in ("p5e.48xlarge", "p5.48xlarge", "tpu-v6e-16", "trn1.32xlarge")]
    ranked = planner.finish(rows, 1e11, None, None)
    priced = [r for r in ranked if r["usd_per_1m_tokens"] is not None]
    assert [r["usd_per_1m_tokens"] for r in priced] == sorted(r["usd_per_1m_tokens"] for r in priced)
    assert ranked[0]["usd_per_1m_tokens"] is not None
    assert [r["target"] for r in ranked[-2:]] == ["p5e.48xlarge", "trn1.32xlarge"]   # no price; does not fit


def test_trn1_torch_holds_the_whole_state_on_every_core():
    """torch on trn1 is PyTorch/XLA without FSDP2 (hal/neuron.py): data parallel, as hal.torch_backend says."""
    from hal.torch_backend import _torch_mesh
    row = planner.plan_target(SIZES["llama3.2-1b"], planner.parse_target("trn1.32xlarge", CATALOG), CATALOG,
                              settings())
    assert row["mesh"] == _torch_mesh(None, "auto", "trn1.32xlarge", 32, fsdp2=False)[0] == \
        {"data": 32, "fsdp": 1, "tensor": 1}
    assert row["memory_gb"]["params+moments"] == pytest.approx(num_params(SIZES["llama3.2-1b"]) * 12 / 1e9, rel=1e-3)
    assert not row["fits"]


@pytest.mark.parametrize("bad", ["v5p-7", "12xh100", "9xfoo", "trn3.48xlarge"])
def test_unknown_targets_refused(bad):
    with pytest.raises(UserError):
        planner.parse_target(bad, CATALOG)


@pytest.mark.slow
def test_cli_writes_plan_json_png_and_command(tmp_path):
    r = plan(["model=llama3.1-8b", "plan.targets=[1xh100,p5.48xlarge,tpu-v5p-64,trn2.48xlarge,8xh200]",
              "plan.tokens=1e12"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "plan.json").read_text())
    for row in rows:
        assert {"target", "fits", "per_device_gb", "mesh", "tokens_per_s", "usd_per_1m_tokens"} <= set(row)
    assert (tmp_path / "plan.png").stat().st_size > 1000
    assert "launch: python -m launch.render" in r.stdout and "tpu-v5p-64 = 32 v5p chips" in r.stdout
    assert "no on-demand price" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args,expect", [
    (["plan.targets=[nope]"], "unknown target"), (["plan.tokens=-5"], "plan.tokens"),
    (["plan.hours=2"], "plan.hours"), (["plan.bogus=1"], "plan.bogus"),
    (["plan.hf_dir=/nonexistent"], "cannot read")])
def test_bad_input_is_one_line_exit_2(tmp_path, args, expect):
    r = plan(["model=small", *args], tmp_path)
    assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_hf_directory(tmp_path):
    from launch.plan import model_of
    from models.hf import config_to_hf
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(SIZES["llama3.2-1b"])))
    cfg, name = model_of({"plan": {"hf_dir": str(tmp_path)}, "model": {}})
    assert cfg == SIZES["llama3.2-1b"] and name is None


@pytest.mark.parametrize("target,accel,nodes", [("16xh100", "H100:8", 2), ("tpu-v5p-128", "tpu-v5p-128", 1),
                                                ("trn2.48xlarge", "Trainium2:16", 1)])
def test_skypilot_task(target, accel, nodes):
    """Checked against SkyPilot's documented task fields (docs.skypilot.co reference/yaml-spec)."""
    r = subprocess.run([sys.executable, "-m", "launch.render", "skypilot", "--target", target, "--image", "x", "--",
                        "model=small"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    task = yaml.safe_load(r.stdout)
    assert set(task) <= {"name", "workdir", "num_nodes", "resources", "envs", "setup", "run", "file_mounts"}
    assert set(task["resources"]) <= {"infra", "accelerators", "instance_type", "accelerator_args"}
    assert task["resources"]["accelerators"] == accel and task["num_nodes"] == nodes
    assert "launch.train" in task["run"] and all(isinstance(v, str) for v in task["envs"].values())


def _bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("plan_memory", ROOT / "bench" / "plan_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("devices,variant", [(1, "memory"), (2, "fsdp")])
def test_jax_memory_within_15_percent_of_xla(devices, variant):
    """XLA's compiled memory analysis of the real JAX train step (bench/plan_memory.py)."""
    got = _bench().measure("tiny", devices, "4,128,fp32,0", variant, CHUNK)
    assert isinstance(got, dict), got
    predicted = sum(planner.memory(SIZES["tiny"], got["mesh"], "jax", 4, 128, "fp32", False, "materialized",
                                   platform="cpu", loss_chunk=CHUNK).values())
    assert abs(predicted / got["measured"] - 1) < 0.15, (predicted, got)


@pytest.mark.slow
def test_torch_memory_within_15_percent_of_mem_tracker():
    """torch's MemTracker over a real TorchBackend step on 2 gloo processes (bench/plan_memory.py)."""
    got = _bench().measure_torch("tiny", 2, "8,128,bf16,0", CHUNK)
    assert isinstance(got, dict) and got["mesh"]["fsdp"] == 2, got
    predicted = sum(planner.memory(SIZES["tiny"], got["mesh"], "torch", 8, 128, "bf16", False, "flash",
                                   platform="cpu", loss_chunk=CHUNK).values())
    assert abs(predicted / got["measured"] - 1) < 0.15, (predicted, got)


@pytest.mark.slow
@pytest.mark.parametrize("loss_chunk", [0, 512, CHUNK])
def test_jax_loss_memory_within_15_percent_of_xla(loss_chunk):
    """The loss's buffers where they matter: llama3.2-1b's 128,256-token vocabulary with 2 of its layers,
    2 x 1024 tokens on one device (XLA's memory analysis, bench/plan_memory.py): whole logits, chunks of 512
    tokens, and the default chunk, which JAX pads to a whole chunk."""
    got = _bench().measure("llama3.2-1b@2", 1, "2,1024,fp32,0", "memory", loss_chunk)
    assert isinstance(got, dict), got
    cfg = _bench().model_config("llama3.2-1b@2")
    predicted = sum(planner.memory(cfg, got["mesh"], "jax", 2, 1024, "fp32", False, "materialized", platform="cpu",
                                   loss_chunk=loss_chunk).values())
    assert abs(predicted / got["measured"] - 1) < 0.15, (predicted, got)


def test_chunked_loss_holds_one_chunk_not_the_logits():
    cfg, one = SIZES["llama3.2-1b"], {"data": 1, "fsdp": 1, "tensor": 1}
    vocab, hidden, tokens = cfg.vocab_size, cfg.hidden_size, 8 * 2048
    for framework in ("jax", "torch"):
        whole = planner.memory(cfg, one, framework, 8, 2048, "bf16", False, "flash", loss_chunk=0)
        chunked = planner.memory(cfg, one, framework, 8, 2048, "bf16", False, "flash", loss_chunk=CHUNK)
        assert whole["logits"] >= tokens * vocab * 10
        assert chunked["logits"] < whole["logits"] / 2
        # one chunk's float32 logits and gradient at most, beside the output weight's and hidden states' gradients
        assert chunked["logits"] <= CHUNK * vocab * 10 + vocab * hidden * 8 + tokens * hidden * 4
        rest = {k: v for k, v in chunked.items() if k != "logits"}
        assert rest == {k: v for k, v in whole.items() if k != "logits"}
    # the tensor axis takes the whole (vocabulary-split) logits: loss_chunk changes nothing there
    tp = {"data": 1, "fsdp": 2, "tensor": 4}
    assert planner.memory(cfg, tp, "jax", 8, 2048, "bf16", False, "flash", loss_chunk=CHUNK) == \
        planner.memory(cfg, tp, "jax", 8, 2048, "bf16", False, "flash", loss_chunk=0)


def test_chunk_tokens_follow_the_models():
    """Both frameworks take loss_chunk // rows positions of every row a chunk, at most the whole row."""
    assert planner.chunk_tokens(8, 2048, 4096) == 4096
    assert planner.chunk_tokens(2, 1024, 4096) == 2048          # a row shorter than a chunk: the whole row
    assert planner.chunk_tokens(8192, 2048, 4096) == 8192     # at least one position a row


def test_loss_chunk_reaches_the_plan_and_its_command():
    cfg = SIZES["llama3.2-1b"]
    target = planner.parse_target("1xh100", CATALOG)
    chunked = planner.plan_target(cfg, target, CATALOG, settings(micro_batch=8, remat=False))
    whole = planner.plan_target(cfg, target, CATALOG, settings(micro_batch=8, remat=False, loss_chunk=0))
    assert chunked["memory_gb"]["logits"] < whole["memory_gb"]["logits"] / 2
    from launch.plan import launch_command
    p = {"seq_len": 2048, "global_batch": 256, "precision": "bf16", "hf_dir": None}
    assert "trainer.loss_chunk" not in launch_command(chunked, "llama3.2-1b", {**p, "loss_chunk": CHUNK})
    assert "trainer.loss_chunk=0" in launch_command(whole, "llama3.2-1b", {**p, "loss_chunk": 0})


def test_fp8_is_sized_as_bf16_and_refused_without_float8_tensor_cores():
    cfg = SIZES["llama3.2-1b"]
    for framework, attention in (("jax", "materialized"), ("torch", "flash")):
        mesh = {"data": 1, "fsdp": 8, "tensor": 1}
        assert planner.memory(cfg, mesh, framework, 8, 2048, "fp8", False, attention) == \
            planner.memory(cfg, mesh, framework, 8, 2048, "bf16", False, attention)
    assert planner.attention_kind("gpu", "jax", "fp8") == "flash"
    rows = {t: planner.plan_target(cfg, planner.parse_target(t, CATALOG), CATALOG, settings(precision="fp8"))
            for t in ("p5.48xlarge", "8xh200", "tpu-v5p-16", "trn2.48xlarge")}
    bf16 = planner.plan_target(cfg, planner.parse_target("p5.48xlarge", CATALOG), CATALOG, settings())
    assert rows["p5.48xlarge"]["fits"] and rows["8xh200"]["fits"]
    assert rows["p5.48xlarge"]["step_s"] == bf16["step_s"]      # MFU against the bf16 peak, as observe logs it
    for t in ("tpu-v5p-16", "trn2.48xlarge"):
        assert not rows[t]["fits"] and rows[t]["tokens_per_s"] is None
        assert any("float8 tensor cores" in p and "\n" not in p for p in rows[t]["problems"]), rows[t]["problems"]
    notes = planner.assumptions(CATALOG, settings(precision="fp8"), {"h100"})
    assert any(n.startswith("fp8:") and "bf16 peak" in n for n in notes)


@pytest.mark.parametrize("kind,chip", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"),
                                       ("cpu", None)])
def test_device_kind_to_chip(kind, chip):
    from launch.plan_measure import chip_of
    assert chip_of(kind) == chip


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_measure_runs_real_steps(framework):
    """--measure's few real steps through hal.make_backend on this CPU: a throughput, and no MFU (the CPU is
    no chip of chips.yaml)."""
    from launch.plan_measure import measure
    p = {"measure_model": "tiny", "measure_framework": framework, "seq_len": 64, "precision": "fp32"}
    found = measure(p, CATALOG, steps=2, warmup=1)
    assert found["tokens_per_s"] > 0 and found["chip"] is None and found["mfu"] is None
    assert "tiny on 1 cpu device(s)" in found["summary"] and framework in found["summary"]


@pytest.mark.slow
def test_cli_measure_logs_the_measurement(tmp_path):
    r = plan(["model=tiny", "plan.targets=[1xh100]", "plan.measure_model=tiny", "plan.seq_len=64",
              "plan.global_batch=8", "plan.chart=false", "--measure"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "measured: tiny on 1 cpu device(s)" in r.stdout + r.stderr
    assert json.loads((tmp_path / "plan.json").read_text())[0]["mfu_source"] == "assumed"


def _colored_pixels(path) -> int:
    """Pixels whose red, green and blue differ by more than 40 (markers; axes, text and grid are grey)."""
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (800, 500)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 40).sum())


def test_chart_png_has_a_point_per_priced_target(tmp_path):
    from launch.plan import chart
    cfg = SIZES["llama3.2-1b"]
    names = ["p5.48xlarge", "tpu-v6e-16", "trn2.48xlarge"]
    rows = planner.finish([planner.plan_target(cfg, planner.parse_target(t, CATALOG), CATALOG, settings())
                           for t in names], 1e11, None, None)
    assert all(r["usd_total"] for r in rows)
    chart(rows, tmp_path / "plan.png", 1e11)
    unpriced = [dict(r, usd_total=None) for r in rows]
    chart(unpriced, tmp_path / "empty.png", 1e11)
    assert _colored_pixels(tmp_path / "plan.png") > 3 * 40     # three markers of about 80 pixels each
    assert _colored_pixels(tmp_path / "empty.png") == 0
