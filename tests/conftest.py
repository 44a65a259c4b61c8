import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one compute thread each. torch's OpenMP threads spin-wait; two
    # processes each spinning on both cores run a torch step ~10x slower than one thread each.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Tokenize the built-in corpus once per session, into a temp cache (not the user's)."""
    os.environ.setdefault("TRICHIP_CACHE", str(tmp_path_factory.mktemp("cache")))


def compose(overrides=()):
    """The run config exactly as `python -m launch.train OVERRIDES` would build it, as a plain dict."""
    from configs.schema import compose as compose_run
    cfg = compose_run(overrides)
    cfg.pop("run_dir", None)
    return cfg


def train(run_dir, *overrides):
    from trainer.loop import train as run_training
    return run_training(compose(overrides), run_dir)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def cli(module, *args, cwd=None, timeout=600):
    """Run `python -m module args...` as a user would; returns CompletedProcess (text)."""
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
