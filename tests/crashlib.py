"""kill -9 at random moments, resume, repeat: the loss sequence must equal an uninterrupted run's, bitwise."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

from tests.conftest import ROOT, metrics

STEPS = 60
ARGS = [f"trainer.steps={STEPS}", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2", "trainer.eval_every=6",
        "trainer.global_batch=4", "trainer.seq_len=32", "trainer.log_every=6"]


def start(framework, run_dir):
    return subprocess.Popen([sys.executable, "-m", "launch.train", f"hal={framework}", *ARGS, f"run_dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(run_dir):
    try:
        return len(metrics(run_dir)) == STEPS and (run_dir / "checkpoints" / str(STEPS) / "manifest.json").exists()
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _steps_done(run):
    try:
        return len(metrics(run))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _check_against(run, ref):
    got = np.array([m["loss"] for m in metrics(run)])
    want = np.array([m["loss"] for m in metrics(ref)])
    np.testing.assert_array_equal(got, want)
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())


def crash_and_resume(framework, tmp_path, kills=20, seed=0):
    """SIGKILL runs at random moments (kills in all), resuming each until it completes; every completed
    run must equal the uninterrupted reference bitwise. Returns how many kills hit a training run."""
    ref = tmp_path / "ref"
    p = start(framework, ref)
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    rng = random.Random(seed)
    killed, mid_run, n = 0, 0, 0
    while killed < kills:
        run = tmp_path / f"crashy{n}"
        while killed < kills and not finished(run):
            before = _steps_done(run)
            p = start(framework, run)
            if rng.random() < 0.25:              # some kills during start-up, compile or restore
                time.sleep(rng.uniform(0.5, 3.0))
            else:                                # most while it trains and saves: wait for a new step
                deadline = time.time() + 120
                while p.poll() is None and _steps_done(run) <= before and time.time() < deadline:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 1.0))
            if p.poll() is not None:             # finished before the kill
                assert p.returncode == 0, p.stderr.read()[-3000:]
                continue
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed += 1
            try:
                mid_run += 0 < len(metrics(run)) < STEPS    # killed while training or saving
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        while not finished(run):
            p = start(framework, run)
            assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
        _check_against(run, ref)
        n += 1
    assert mid_run >= 5, f"only {mid_run} of {killed} kills landed while a run trained"
    return mid_run
