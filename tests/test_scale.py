"""Sharded training: JAX meshes on 8 host devices, multi-process JAX, PyTorch FSDP2 over 2 gloo
processes under torchrun — each equal to the single-device run — and checkpoints that move between
them (8 JAX devices <-> 2 torch processes)."""
import json
import os
import shutil
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, metrics, train
from tests.tolerances import LOSS_RTOL

import subprocess

STEPS = 20
COMMON = [f"trainer.steps={STEPS}", "trainer.checkpoint_every=10", "trainer.eval_every=10", "optim.lr=5e-4",
          "optim.warmup_steps=5", "trainer.global_batch=8", "trainer.seq_len=64", "trainer.log_every=10"]
MICRO = 8           # trainer.global_batch, no accumulation
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def launch(run_dir, *args, env=None, nproc=1):
    """python -m launch.train (or torchrun with nproc processes), as a user launches it."""
    cmd = [sys.executable, "-m", "launch.train"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "launch.train"]
    r = subprocess.run(cmd + [*args, *COMMON, f"run_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def losses(run_dir):
    return np.array([m["loss"] for m in metrics(run_dir)])


def rel(a, b):
    """The largest relative gap of loss curve a from b, printed beside its bound (pytest -s)."""
    assert len(a) == len(b)
    gap = float((np.abs(a - b) / np.abs(b)).max())
    print(f"max rel gap {gap:.2e} (bound {LOSS_RTOL:.0e})")
    return gap


def writer(run_dir, step):
    return json.loads((run_dir / "checkpoints" / str(step) / "manifest.json").read_text())["writer"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-device references, in this process (one CPU device)."""
    root = tmp_path_factory.mktemp("single")
    for fw in ("jax", "torch"):
        train(root / fw, f"hal={fw}", *COMMON)
    return {fw: root / fw for fw in ("jax", "torch")}


@pytest.mark.parametrize("mesh", [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1},
                                  {"data": 1, "fsdp": 8, "tensor": 1}, {"data": 1, "fsdp": 2, "tensor": 4}])
def test_jax_mesh_on_8_devices_equals_single_device(single, tmp_path, mesh):
    override = "hal.mesh={" + ",".join(f"{k}:{v}" for k, v in mesh.items()) + "}"
    launch(tmp_path / "run", "hal=jax", override, env=EIGHT_DEVICES)
    assert writer(tmp_path / "run", STEPS)["mesh"] == mesh and writer(tmp_path / "run", STEPS)["device_count"] == 8
    assert rel(losses(tmp_path / "run"), losses(single["jax"])) <= LOSS_RTOL


def reads_half_the_rows(r, micro):
    """Each of 2 processes reads only its half of every micro-batch (the global batch is the same)."""
    half = micro // 2
    for rank in (0, 1):
        assert f"process {rank} reads rows {rank * half}:{(rank + 1) * half} of each micro-batch of {micro}" in r.stdout + r.stderr


def test_fsdp2_two_processes_equals_single_process(single, tmp_path):
    r = launch(tmp_path / "run", "hal=torch", "trainer.async_save=true", nproc=2)   # (auto blocks on CPUs)
    reads_half_the_rows(r, MICRO)
    w = writer(tmp_path / "run", STEPS)
    assert w["process_count"] == 2 and w["comm_backend"] == "gloo" and w["mesh"]["fsdp"] == 2
    assert rel(losses(tmp_path / "run"), losses(single["torch"])) <= LOSS_RTOL


def test_fsdp2_hybrid_sharding(single, tmp_path):
    launch(tmp_path / "run", "hal=torch", "hal.mesh={data:2,fsdp:1}", nproc=2)
    assert writer(tmp_path / "run", STEPS)["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert rel(losses(tmp_path / "run"), losses(single["torch"])) <= LOSS_RTOL


def test_multiprocess_jax_trains_and_checkpoints(single, tmp_path):
    r = launch(tmp_path / "run", "hal=jax", nproc=2)
    reads_half_the_rows(r, MICRO)
    w = writer(tmp_path / "run", STEPS)
    assert w["process_count"] == 2 and w["device_count"] == 2
    assert rel(losses(tmp_path / "run"), losses(single["jax"])) <= LOSS_RTOL
    # several writers: OCDBT (hal.store); one writer: a zarr array per tensor
    assert (tmp_path / "run" / "checkpoints" / str(STEPS) / "state" / "manifest.ocdbt").exists()
    assert not (single["jax"] / "checkpoints" / str(STEPS) / "state" / "manifest.ocdbt").exists()
    # and its checkpoint comes back on one process, resharded
    shutil.rmtree(tmp_path / "run" / "checkpoints" / str(STEPS))
    assert train(tmp_path / "run", "hal=jax", *COMMON)["start_step"] == 10
    assert rel(losses(tmp_path / "run"), losses(single["jax"])) <= LOSS_RTOL


def _crash_at_10(src, dst):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / str(STEPS))


def test_jax_8_devices_to_torch_2_processes_and_back(single, tmp_path):
    jax8 = tmp_path / "jax8"
    launch(jax8, "hal=jax", "hal.mesh={data:2,fsdp:4}", env=EIGHT_DEVICES)
    resumed = tmp_path / "on_torch"
    _crash_at_10(jax8, resumed)
    launch(resumed, "hal=torch", nproc=2)
    assert writer(resumed, STEPS)["framework"] == "torch"
    assert rel(losses(resumed), losses(jax8)) <= LOSS_RTOL

    back = tmp_path / "back_on_jax"
    _crash_at_10(resumed, back)               # torch's step-10 checkpoint is the JAX one it resumed from
    shutil.rmtree(back / "checkpoints" / "10")
    shutil.copytree(_torch2_run(tmp_path) / "checkpoints" / "10", back / "checkpoints" / "10")
    launch(back, "hal=jax", "hal.mesh={fsdp:8}", env=EIGHT_DEVICES)
    assert writer(back, STEPS)["framework"] == "jax"
    assert rel(losses(back)[10:], losses(_torch2_run(tmp_path))[10:]) <= LOSS_RTOL


def _torch2_run(tmp_path):
    run = tmp_path / "torch2"
    if not run.exists():
        launch(run, "hal=torch", "trainer.async_save=true", nproc=2)   # its checkpoints: written in the background
        assert writer(run, 10)["process_count"] == 2
    return run


@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_activation_checkpointing_computes_the_same(single, tmp_path, fw):
    train(tmp_path / "remat", f"hal={fw}", *COMMON, "trainer.remat=true")
    assert rel(losses(tmp_path / "remat"), losses(single[fw])) <= LOSS_RTOL


def test_bf16_fsdp2_mixed_precision_trains(tmp_path):
    launch(tmp_path / "run", "hal=torch", "trainer.precision=bf16", nproc=2)
    ls = losses(tmp_path / "run")
    assert np.isfinite(ls).all() and ls[-1] < ls[0] - 1.0
    assert writer(tmp_path / "run", STEPS)["precision"] == "bf16"
