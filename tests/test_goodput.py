"""Restart-to-first-step time, goodput and the persistent compile caches: the Clock's accounting, the
process start read from /proc, the records a fresh and a resumed run write (run.json, metrics.jsonl, the
loggers' tags), and XLA's cache filled by one run and read by the next."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hal import compile_cache
from tests.conftest import ROOT, cli, metrics, train
from trainer import goodput
from trainer.goodput import KINDS, Clock
from trainer.observe import scalar_values

FAST = ["trainer.global_batch=4", "trainer.seq_len=32", "trainer.log_every=2", "trainer.eval_every=2",
        "trainer.eval_batches=1", "trainer.checkpoint_every=2"]
RESTART_PARTS = ("startup_s", "data_open_s", "restore_s", "loggers_s", "first_step_s", "other_s")


# -- the Clock ---------------------------------------------------------------------------------------------

class Ticks:
    """A timer that moves only when told to: the Clock's arithmetic on known times."""
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_clock_splits_the_wall_time_into_productive_and_lost():
    t = Ticks()
    clock = Clock(t.now - 2.0, "test", timer=t)     # started 2 s ago
    with clock.phase("data_open"):
        t.now += 0.5
    t.now += 0.25
    clock.ready()                                   # startup: 2 + 0.25 s
    with clock.phase("restore"):
        t.now += 1.0
        with clock.phase("checkpoint"):             # inside another phase: counted as the outer one
            t.now += 1.0
    for seconds in (5.0, 1.0, 3.0, 1.0, 1.0):
        t.now += seconds
        clock.step(seconds)
        with clock.phase("checkpoint"):
            t.now += 0.5
    t.now += 0.75                                   # unattributed
    r = clock.restart()
    assert r["restart_to_first_step_s"] == 9.75 and r["startup_s"] == 2.25 and r["data_open_s"] == 0.5
    assert r["restore_s"] == 2.0 and r["first_step_s"] == 5.0 and r["other_s"] == 0.0 and r["compile_s"] == 4.0
    s = clock.summary()
    assert s["wall_s"] == 2.0 + 0.5 + 0.25 + 2.0 + 11.0 + 2.5 + 0.75
    assert s["productive_s"] == 11.0 - 4.0 and s["goodput"] == pytest.approx(7.0 / s["wall_s"])
    assert s["badput_s"] == {**dict.fromkeys(KINDS, 0.0), "startup": 2.25, "data_open": 0.5, "restore": 2.0,
                             "compile": 4.0, "checkpoint": 2.5, "other": 0.75}
    # after warm-up: steps 2-5 (6 s) over the wall time from step 1's end to step 5's (6 s + 4 x 0.5 s)
    assert s["goodput_after_warmup"] == pytest.approx(6.0 / 8.0)
    assert sum(s["badput"].values()) + s["goodput"] == pytest.approx(1.0)
    m = clock.metrics()
    assert m["goodput"] == s["goodput"] and m["badput/checkpoint"] == 2.5 / s["wall_s"]


def test_clock_restart_record():
    t = Ticks()
    clock = Clock(timer=t)
    assert clock.restart() is None
    with clock.phase("data_open"):
        t.now += 0.25
    with clock.phase("loggers"):
        t.now += 0.5
    t.now += 0.5
    clock.step(0.5)                                 # ready() not called: the backend was ready when it began
    r = clock.restart()
    assert r["compile_s"] is None and r["origin"] == "train() call"
    assert {k: r[k] for k in RESTART_PARTS} == {"startup_s": 0.0, "data_open_s": 0.25, "restore_s": 0.0,
                                                "loggers_s": 0.5, "first_step_s": 0.5, "other_s": 0.0}
    assert r["restart_to_first_step_s"] == 1.25
    t.now += 0.125
    clock.step(0.125)
    assert clock.restart()["compile_s"] == 0.375
    with pytest.raises(ValueError):
        with clock.phase("lunch"):
            pass


def test_before_the_backend_is_ready_everything_is_startup():
    s = Clock(time.perf_counter() - 1.0).summary()
    assert s["badput_s"]["startup"] == pytest.approx(s["wall_s"]) and s["productive_s"] == 0


def test_process_start_is_the_kernels():
    """A child's age, read in the child, is within the time the parent saw it live (plus /proc's 10 ms ticks)."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here: the clock falls back to the import of trainer.goodput")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "from trainer.goodput import process_start, process_age; "
                          "print(process_age(), process_start()[1])"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=1)
    lived = time.perf_counter() - t0
    assert 0 <= float(out[0]) <= lived + 0.03 and out[1].strip() == "process start"
    start, source = goodput.process_start()
    assert source == "process start" and start <= time.perf_counter()


def test_goodput_tags_are_written_as_named():
    values = {"goodput": 0.5, "badput/compile": 0.25, "restart_to_first_step_s": 3.0, "restart/startup_s": 1.0,
              "loss": 2.0}
    assert set(scalar_values(values)) == {"goodput", "badput/compile", "restart_to_first_step_s",
                                          "restart/startup_s", "train/loss"}


# -- compile caches ------------------------------------------------------------------------------------------

def test_compile_cache_directories(monkeypatch, tmp_path):
    monkeypatch.setenv("TRICHIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    user = compile_cache.default_root().name
    for setting in (None, ""):
        assert compile_cache.directory(setting, "jax") == tmp_path / "cache" / "compile" / user / "jax"
        assert compile_cache.directory(setting, "torch") == tmp_path / "cache" / "compile" / user / "inductor"
    assert compile_cache.directory(str(tmp_path / "cc"), "torch") == tmp_path / "cc" / "inductor"
    assert compile_cache.directory("off", "jax") is None and compile_cache.directory(False, "torch") is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))    # the framework's own variable
    assert compile_cache.directory(None, "jax") == tmp_path / "mine"
    assert compile_cache.directory(str(tmp_path / "cc"), "jax") == tmp_path / "cc" / "jax"


def test_compile_cache_off_and_on_from_the_command_line():
    from tests.conftest import compose
    for value, expect in (("off", "off"), ("false", "False"), (None, None)):
        cfg = compose([f"hal.compile_cache_dir={value}"] if value else [])
        assert cfg["hal"]["compile_cache_dir"] == expect
        assert (compile_cache.directory(expect, "jax") is None) == (value is not None)
    assert compose(["hal=torch"])["hal"]["compile_cache_dir"] is None


def test_torch_inductor_caches_follow_the_setting(monkeypatch, tmp_path):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    monkeypatch.setattr(inductor_config, "fx_graph_cache", inductor_config.fx_graph_cache)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", functorch_config.enable_autograd_cache)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "was")))
    assert compile_cache.configure_torch("off") is None
    assert not inductor_config.fx_graph_cache and not functorch_config.enable_autograd_cache
    path = compile_cache.configure_torch(str(tmp_path / "cc"))
    assert path == tmp_path / "cc" / "inductor" and cache_dir() == str(path)    # where inductor will look
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache


# -- runs ------------------------------------------------------------------------------------------------------

def _check_run(run_dir: Path, start: int, end: int) -> dict:
    """run.json's last_run and the metrics of the launch that trained steps start+1..end, checked."""
    last = json.loads((run_dir / "run.json").read_text())["last_run"]
    r, g = last["restart"], last["goodput"]
    assert all(r[k] >= 0 for k in RESTART_PARTS) and r["compile_s"] is not None and r["compile_s"] >= 0
    assert sum(r[k] for k in RESTART_PARTS) == pytest.approx(r["restart_to_first_step_s"], abs=1e-6)
    assert r["compile_s"] <= r["first_step_s"] and r["restart_to_first_step_s"] <= g["wall_s"]
    assert 0 < g["goodput"] <= 1 and set(g["badput_s"]) == set(KINDS)
    assert g["goodput"] < g["goodput_after_warmup"] <= 1     # startup, restore and compile are left out
    assert all(v >= 0 for v in g["badput_s"].values())
    assert g["productive_s"] + sum(g["badput_s"].values()) == pytest.approx(g["wall_s"], abs=1e-6)
    assert g["goodput"] + sum(g["badput"].values()) == pytest.approx(1.0, abs=1e-6)
    assert g["badput_s"]["checkpoint"] > 0 and g["badput_s"]["eval"] > 0 and g["badput_s"]["restore"] > 0
    lines = {m["step"]: m for m in metrics(run_dir)}
    first = lines[start + 1]
    assert first["restart_to_first_step_s"] == pytest.approx(r["restart_to_first_step_s"])
    assert all(first[f"restart/{k}"] == pytest.approx(r[k]) for k in RESTART_PARTS)
    assert not any("restart_to_first_step_s" in lines[s] for s in range(start + 2, end + 1))
    for s in range(start + 1, end + 1):
        logged = s % 2 == 0 or s == end
        assert ("goodput" in lines[s]) == logged
        if logged:
            assert 0 <= lines[s]["goodput"] <= 1 and all(f"badput/{k}" in lines[s] for k in KINDS)
    return last


@pytest.mark.slow
@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_fresh_and_resumed_runs_record_restart_and_goodput(tmp_path, fw):
    run = tmp_path / "run"
    summary = train(run, f"hal={fw}", "trainer.steps=3", *FAST)
    last = _check_run(run, 0, 3)
    assert last["restart"]["origin"] == "train() call" and summary["goodput"] == last["goodput"]
    assert (last["compile_cache_dir"] is not None) == (fw == "jax")
    train(run, f"hal={fw}", "trainer.steps=6", *FAST)
    resumed = _check_run(run, 3, 6)
    assert resumed["restart"] != last["restart"]


@pytest.mark.slow
def test_launch_counts_from_the_process_start_and_a_restart_reads_the_compile_cache(tmp_path, monkeypatch):
    """Two processes on one run dir and one compile cache: the first fills the cache, the resumed one reads
    its train step from it (JAX logs each persistent-cache hit at debug level, into the run's train.log)."""
    run, cache = tmp_path / "run", tmp_path / "cc"
    monkeypatch.setenv("JAX_DEBUG_LOG_MODULES", "jax._src.compiler")
    hits = "Persistent compilation cache hit for 'jit_train_step'"
    common = ["hal=jax", *FAST, f"hal.compile_cache_dir={cache}", f"run_dir={run}"]
    r = cli("launch.train", "trainer.steps=2", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(p.name.startswith("jit_train_step-") for p in (cache / "jax").iterdir())
    assert hits not in (run / "train.log").read_text()
    first = _check_run(run, 0, 2)
    r = cli("launch.train", "trainer.steps=4", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert hits in (run / "train.log").read_text()
    resumed = _check_run(run, 2, 4)
    for last in (first, resumed):
        assert last["restart"]["origin"] == last["goodput"]["origin"] == "process start"
        assert last["compile_cache_dir"] == str(cache / "jax")
        assert math.isfinite(last["restart"]["startup_s"]) and last["restart"]["startup_s"] > 0
    assert "first step done" in r.stdout + r.stderr and "goodput" in r.stdout + r.stderr


@pytest.mark.slow
def test_two_processes_record_from_process_0(tmp_path):
    """torchrun, 2 gloo processes: process 0 writes the records, counted from its own process start."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "launch.train", "hal=torch", "trainer.steps=3", *FAST, f"run_dir={run}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    last = _check_run(run, 0, 3)
    assert last["restart"]["origin"] == "process start" and last["compile_cache_dir"] is None
    assert len(metrics(run)) == 3
