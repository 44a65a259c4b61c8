"""Preemption signals, damaged checkpoints, failing saves, NaNs and concurrent runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, cli, metrics

FAST = ["trainer.global_batch=4", "trainer.seq_len=32", "trainer.log_every=5"]
# Every wait below ends on an event (a metrics line, a file, a process exit); this bound is reached only
# by a hung process, never by a slow one on a loaded machine.
HUNG = 1800


def one_error_line(r, code):
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def _popen(*args):
    return subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(event, proc, what: str) -> None:
    """Poll until event() is true; fail with the process's output if it exits first (or hangs)."""
    deadline = time.monotonic() + HUNG
    while not event():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {HUNG} s: hung")
        time.sleep(0.005)


def _wait_for_step(run, step, proc):
    def reached():
        try:
            return len(metrics(run)) >= step
        except (FileNotFoundError, json.JSONDecodeError):       # not yet written, or a line half-written
            return False
    _wait_for(reached, proc, f"step {step}")


@pytest.mark.parametrize("fw,sig", [("jax", signal.SIGTERM), ("torch", signal.SIGINT)])
def test_preemption_signal_checkpoints_and_exits_0(tmp_path, fw, sig):
    run = tmp_path / "run"
    p = _popen(f"hal={fw}", "trainer.steps=100000", "trainer.checkpoint_every=0", *FAST, f"run_dir={run}")
    _wait_for_step(run, 3, p)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=HUNG)
    assert p.returncode == 0, out[-3000:]
    stopped = [ln for ln in out.splitlines() if f"stopped by {signal.Signals(sig).name}" in ln]
    assert len(stopped) == 1
    steps = [m["step"] for m in metrics(run)]
    ckpts = sorted(int(p.name) for p in (run / "checkpoints").iterdir())
    assert ckpts == [steps[-1]]                     # a checkpoint of the last finished step
    # and it resumes from there
    r = cli("launch.train", f"hal={fw}", f"trainer.steps={steps[-1] + 2}", "trainer.checkpoint_every=0", *FAST,
            f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["step"] for m in metrics(run)] == list(range(1, steps[-1] + 3))


def test_second_signal_exits_at_once_without_damage(tmp_path):
    """A second SIGTERM while the first one's checkpoint is being written exits at once; the half-written
    checkpoint is never read, the newest complete one is whole. The second signal is sent when that
    checkpoint's temp directory appears: with trainer.checkpoint_every=0 only the first signal starts a
    save, so its handler has run by then (two signals before it runs would count as one)."""
    run = tmp_path / "run"
    slow = ["model=small", "trainer.global_batch=8", "trainer.seq_len=128", "trainer.async_save=false"]  # ~300 MB
    r = cli("launch.train", "hal=torch", "trainer.steps=2", "trainer.checkpoint_every=1", *slow, f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    p = _popen("hal=torch", "trainer.steps=100000", "trainer.checkpoint_every=0", *slow, f"run_dir={run}")
    try:
        _wait_for_step(run, 3, p)
        p.send_signal(signal.SIGTERM)
        _wait_for(lambda: any(d.name.startswith(".tmp-") for d in (run / "checkpoints").iterdir()), p,
                  "the checkpoint the first signal asked for")
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=HUNG)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "second SIGTERM: exiting now" in out and "stopped by" not in out
    assert sorted(d.name for d in (run / "checkpoints").iterdir() if not d.name.startswith(".tmp-")) == ["1", "2"]
    # the newest complete checkpoint is whole: a strict resume uses it
    r = cli("launch.train", "hal=torch", "trainer.steps=2", "trainer.checkpoint_every=1", *slow,
            "trainer.strict_resume=true", f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    starts = [ln for ln in (run / "train.log").read_text().splitlines() if "start at step" in ln]
    assert "start at step 2 from" in starts[-1] and "checkpoints/2 " in starts[-1], starts


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    run = tmp_path_factory.mktemp("damage") / "run"
    r = cli("launch.train", "hal=jax", "trainer.steps=4", "trainer.checkpoint_every=2", *FAST, f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _largest_data_file(ckpt):
    """The biggest file of the tensors: a chunk of the largest tensor (orbax's metadata files are small)."""
    files = [p for p in (ckpt / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_checkpoint_falls_back_with_a_warning(two_checkpoints, tmp_path, damage):
    run = _copy(two_checkpoints, tmp_path / "run")
    newest = run / "checkpoints" / "4"
    if damage == "flip":
        f = _largest_data_file(newest)
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f = _largest_data_file(newest)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "delete":
        _largest_data_file(newest).unlink()
    else:
        m = json.loads((newest / "manifest.json").read_text())
        m["tensors"]["params/model.norm.weight"]["digest"] += 1
        (newest / "manifest.json").write_text(json.dumps(m))
    r = cli("launch.train", "hal=torch", "trainer.steps=6", "trainer.checkpoint_every=2", *FAST, f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "falling back to the previous checkpoint" in r.stdout + r.stderr
    assert "checkpoints/4" in (r.stdout + r.stderr)
    log = (run / "train.log").read_text()
    assert "start at step 2 from" in log
    # strict: stop instead, naming the checkpoint
    run2 = _copy(two_checkpoints, tmp_path / "run2")
    m = json.loads((run2 / "checkpoints" / "4" / "manifest.json").read_text())
    m["tensors"]["opt/mu/model.norm.weight"]["digest"] += 1
    (run2 / "checkpoints" / "4" / "manifest.json").write_text(json.dumps(m))
    line = one_error_line(cli("launch.train", "hal=jax", "trainer.strict_resume=true", *FAST, f"run_dir={run2}"), 2)
    assert "checkpoints/4" in line and "opt/mu/model.norm.weight" in line


def test_a_save_that_fails_half_way_keeps_earlier_checkpoints(two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path / "run")
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    cmd = (f"ulimit -f 150; exec {sys.executable} -m launch.train hal=jax trainer.steps=6 "
           f"trainer.checkpoint_every=2 {' '.join(FAST)} run_dir={run}")
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=HUNG)
    line = one_error_line(r, 3)
    assert "checkpoint at step" in line and "intact" in line
    after = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    assert {p: b for p, b in after.items() if p in before} == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    # policy "continue": training goes on to the end
    cmd = cmd.replace("trainer.steps=6", "trainer.steps=6 trainer.on_save_error=continue")
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=HUNG)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(metrics(run)) == 6


@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_a_background_save_that_fails_stops_with_its_step(tmp_path, fw):
    """trainer.async_save=true: the write of step 2 fails in its thread (file size limit); the error comes
    back to the training thread within a step or two, names step 2, and nothing half-written remains."""
    run = tmp_path / "run"
    cmd = (f"ulimit -f 150; exec {sys.executable} -m launch.train hal={fw} trainer.steps=8 trainer.async_save=true "
           f"trainer.checkpoint_every=2 {' '.join(FAST)} run_dir={run}")
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=HUNG)
    line = one_error_line(r, 3)
    assert "checkpoint at step 2 failed" in line and "latest: none" in line, line
    assert 2 <= len(metrics(run)) < 8
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())


@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_nonfinite_loss_stop_or_skip(tmp_path, fw):
    boom = ["optim.lr=1e30", "optim.warmup_steps=0", "trainer.checkpoint_every=1"]
    r = cli("launch.train", f"hal={fw}", "trainer.steps=8", *boom, *FAST, f"run_dir={tmp_path}/stop")
    line = one_error_line(r, 4)
    bad = [m for m in metrics(tmp_path / "stop") if m.get("skipped")]
    assert len(bad) == 1 and f"at step {bad[0]['step']}" in line
    ckpts = sorted(int(p.name) for p in (tmp_path / "stop" / "checkpoints").iterdir())
    assert ckpts[-1] == bad[0]["step"] - 1          # the last good step's checkpoint is kept

    r = cli("launch.train", f"hal={fw}", "trainer.steps=8", "trainer.on_nonfinite=skip", *boom, *FAST,
            f"run_dir={tmp_path}/skip")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(tmp_path / "skip")
    assert len(rows) == 8 and any(m.get("skipped") for m in rows)
    manifest = json.loads((tmp_path / "skip" / "checkpoints" / "8" / "manifest.json").read_text())
    first_bad = min(m["step"] for m in rows if m.get("skipped"))
    # the skipped updates never reached the state: the update count stopped at the last finite step
    from hal.store import read_tensors
    count = int(read_tensors(str(tmp_path / "skip" / "checkpoints" / "8" / "state"), ["opt/count"])["opt/count"])
    assert count == first_bad - 1 + sum(1 for m in rows if m["step"] > first_bad and not m.get("skipped"))
    assert manifest["step"] == 8


def test_second_run_on_the_same_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    p = _popen("hal=jax", "trainer.steps=100000", "trainer.checkpoint_every=0", *FAST, f"run_dir={run}")
    try:
        _wait_for_step(run, 1, p)
        line = one_error_line(cli("launch.train", "hal=torch", *FAST, f"run_dir={run}"), 2)
        assert f"pid {p.pid}" in line and "in use" in line
    finally:
        p.kill()
        p.wait()
    # a run that died does not leave the lock stuck
    r = cli("launch.train", "hal=torch", "trainer.steps=3", "trainer.checkpoint_every=0", *FAST, "trainer.resume=false",
            f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_preemption_of_one_rank_stops_all_ranks_at_the_same_step(tmp_path, fw):
    """SIGTERM reaching one process of a torchrun job: every rank finishes the same step, one checkpoint."""
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "launch.train", f"hal={fw}", "trainer.steps=100000", "trainer.checkpoint_every=0",
                          *FAST, f"run_dir={run}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        _wait_for_step(run, 3, p)
        children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        os.kill(int(children[1]), signal.SIGTERM)            # one rank only
        out, _ = p.communicate(timeout=HUNG)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, out[-3000:]
    steps = [m["step"] for m in metrics(run)]
    manifest = json.loads((run / "checkpoints" / str(steps[-1]) / "manifest.json").read_text())
    assert manifest["writer"]["process_count"] == 2 and manifest["step"] == steps[-1]
    assert "a signal on another process" in out or "stopped by SIGTERM" in out


EXIT_PROBE = """
import atexit, os, sys, time
import torch, torch.distributed as dist
from hal import distributed
atexit.register(lambda: print(f"left {time.time()}", flush=True))     # runs after the process group is left
distributed.EXIT_BARRIER_S = float(sys.argv[2])
rank, n = distributed.initialize_torch("gloo", distributed.LaunchEnv.from_environ())
parts = [torch.zeros(4) for _ in range(n)]
dist.all_gather(parts, torch.full((4,), float(rank)))
if rank == 1 and sys.argv[1] == "gone":
    os._exit(0)                   # no exit handlers: this rank never reaches the exit barrier
if rank == 1 and sys.argv[1] == "late":
    time.sleep(3)
print(f"done {time.time()}", flush=True)
"""


def _exit_probe(tmp_path, mode: str, bound: float) -> dict:
    """Run EXIT_PROBE under torchrun; {rank: {"done": t, "left": t}} from its tagged output."""
    script = tmp_path / "exit_probe.py"
    script.write_text(EXIT_PROBE)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "--tee=3", str(script), mode, str(bound)], cwd=ROOT, capture_output=True, text=True,
                       timeout=HUNG, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    times = {}
    for line in r.stdout.splitlines():
        tag, _, rest = line.partition("]:")          # "[default0]:done 1732...."
        if rest:
            what, t = rest.split()
            times.setdefault(int(tag.strip("[default")), {})[what] = float(t)
    return times


def test_ranks_leave_the_process_group_together(tmp_path):
    """At exit a rank waits for the others before tearing its process group down, so no gloo worker thread
    is still releasing a collective's tensors while the interpreter finalizes (an abort at exit)."""
    times = _exit_probe(tmp_path, "late", 60)
    assert times[0]["left"] >= times[1]["done"]


def test_a_rank_whose_peer_is_gone_still_exits(tmp_path):
    """The exit barrier is bounded: a peer that never reaches it (gone without exit handlers) costs the
    bound at most, never a hang."""
    times = _exit_probe(tmp_path, "gone", 5)
    assert "left" in times[0] and times[0]["left"] - times[0]["done"] <= 5 + 10
    assert 1 not in times or "left" not in times[1]
