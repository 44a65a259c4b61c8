"""The promise: JAX and PyTorch compute the same training run, and hand it to each other mid-way.

Two uninterrupted 100-step runs (float32, lr 5e-4), one per framework, checkpointing at step 50;
then four resumes from step 50: across frameworks (within tests/tolerances.py's LOSS_RTOL, relative) and on
the same framework (bitwise on the CPU). Each cross-framework gap is printed (pytest -s) beside its bound.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import metrics, train
from tests.tolerances import LOSS_RTOL as RTOL

STEPS = 100
COMMON = ["model=tiny", f"trainer.steps={STEPS}", "trainer.checkpoint_every=50", "trainer.eval_every=50",
          "optim.lr=5e-4", "optim.warmup_steps=10", "trainer.global_batch=8", "trainer.micro_batch=4",
          "trainer.seq_len=64", "trainer.log_every=50"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for fw in ("jax", "torch"):
        train(root / fw, f"hal={fw}", *COMMON)
        out[fw] = root / fw
    return out


def losses(run_dir, key="loss"):
    return np.array([m[key] for m in metrics(run_dir) if key in m])


def rel(a, b):
    return np.abs(a - b) / np.abs(b)


def gap(what, a, b):
    """The largest relative gap of curve a from curve b, printed beside its bound."""
    worst = float(rel(a, b).max())
    print(f"max rel gap {what}: {worst:.2e} (bound {RTOL:.0e})")
    return worst


def test_same_loss_curve(runs):
    j, t = losses(runs["jax"]), losses(runs["torch"])
    assert len(j) == len(t) == STEPS
    assert j[-1] < j[0] - 1.0              # it trained
    assert gap("loss jax-torch", j, t) <= RTOL, f"worst step {rel(j, t).argmax() + 1}: {rel(j, t).max():.2e}"
    assert gap("eval_loss jax-torch", losses(runs["jax"], "eval_loss"), losses(runs["torch"], "eval_loss")) <= RTOL


def test_checkpoint_records_who_wrote_it(runs):
    manifest = json.loads((runs["torch"] / "checkpoints" / "50" / "manifest.json").read_text())
    assert manifest["writer"]["framework"] == "torch" and manifest["writer"]["platform"] == "cpu"
    assert manifest["step"] == 50 and manifest["data"]["next_step"] == 50
    assert manifest["tensors"]["opt/count"]["shape"] == []
    assert "torch" in manifest["writer"]["versions"]
    assert manifest["model"]["hidden_size"] == 128


@pytest.mark.parametrize("first,second", [("jax", "torch"), ("torch", "jax"), ("jax", "jax"), ("torch", "torch")])
def test_resume_from_step_50(runs, tmp_path, first, second):
    """Resume the `first` run's step-50 checkpoint on `second`: in its own run dir (as after a crash)."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs[first], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "100")            # the crash came before step 100's save
    summary = train(run_dir, f"hal={second}", *COMMON)
    assert summary["start_step"] == 50
    resumed, ref = losses(run_dir), losses(runs[first])
    assert len(resumed) == STEPS                               # steps 51.. replaced, not appended twice
    if first == second:
        np.testing.assert_array_equal(resumed, ref)            # bitwise on the same framework
    else:
        assert gap(f"resume {first}->{second}", resumed[50:], ref[50:]) <= RTOL
    manifest = json.loads((run_dir / "checkpoints" / "100" / "manifest.json").read_text())
    assert manifest["writer"]["framework"] == second


def test_init_from_another_runs_checkpoint(runs, tmp_path):
    """A new run started from a checkpoint made elsewhere is one override."""
    src = runs["torch"] / "checkpoints" / "50"
    summary = train(tmp_path / "new", "hal=jax", *COMMON, f"trainer.init_from={src}")
    assert summary["start_step"] == 50
    assert gap("init_from torch->jax", losses(tmp_path / "new"), losses(runs["torch"])[50:]) <= RTOL
