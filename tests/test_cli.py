"""The user's commands, run as a user runs them: python -m launch.train / launch.prepare_data."""
import json
import os
import shutil

import numpy as np
import pytest

from models.spec import LlamaConfig, flops_per_token
from tests.conftest import ROOT, cli, metrics
from trainer.data import builtin_text

HUNG = 3600     # seconds: a bound for a hung run only; on a loaded machine 200 steps take many minutes


def test_default_training_beats_the_unigram_baseline(tmp_path):
    """The README's train command, shortened: loss falls well below the unigram baseline in 200 steps."""
    r = cli("launch.train", "hal=torch", "trainer.steps=200", f"run_dir={tmp_path}/run", timeout=HUNG)
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "run"
    log = (run / "train.log").read_text()
    baseline = _unigram_entropy_of_the_train_split()
    assert float(log.split("unigram baseline of the data: ")[1].split()[0]) == pytest.approx(baseline, abs=1e-4)
    rows = metrics(run)
    assert [m["step"] for m in rows] == list(range(1, 201))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    assert rows[-1]["eval_loss"] < baseline - 0.5, (rows[-1], baseline)
    assert "step 100/200 | loss" in log                      # readable log lines every few steps
    assert sorted(os.listdir(run / "checkpoints")) == ["100", "200"]
    assert (run / ".hydra" / "config.yaml").exists() and (run / "run.json").exists()


def _unigram_entropy_of_the_train_split(seq_len: int = 128) -> float:
    """Cross-entropy (nats/token) of predicting each token of the built-in corpus's train part by its
    frequency there: what a model that ignores context scores. The train part is the windows of seq_len + 1
    tokens (stepping by seq_len) before the held-out 5% (data.eval_fraction's default) and the one-window gap."""
    tokens = np.append(np.frombuffer(builtin_text("python_docs").encode(), np.uint8), 256)
    windows = (len(tokens) - 1) // seq_len
    train = windows - max(1, round(windows * 0.05)) - 1
    counts = np.bincount(tokens[: train * seq_len + 1])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_prepare_data_then_train_on_it(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"doc{i}.txt").write_text(("The quick brown fox jumps over the lazy dog. " * 40 + f"{i}\n") * 5)
    r = cli("launch.prepare_data", str(tmp_path / "tok"), str(texts))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "tok" / "dataset.json").read_text())["tokenizer"]["vocab_size"] == 257
    r = cli("launch.train", "hal=jax", "data=tokens", f"data.path={tmp_path / 'tok'}", "trainer.steps=3",
            "trainer.seq_len=32", f"run_dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(metrics(tmp_path / "run")) == 3


def _fails_cleanly(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args,needles", [
    (["hal=tpu9000"], ["hal/tpu9000", "jax", "torch"]),
    (["model=huge"], ["model/huge", "tiny"]),
    (["data.path=/nonexistent/tokens"], ["/nonexistent/tokens", "prepare_data"]),
    (["data=tokens"], ["data.path"]),
    (["trainer.global_batch=10", "trainer.micro_batch=4"], ["trainer.global_batch (10)", "trainer.micro_batch (4)"]),
    (["trainer.seq_len=0"], ["trainer.seq_len"]),
    (["trainer.stepz=3"], ["stepz"]),
    (["model.num_key_value_heads=3"], ["num_key_value_heads"]),
    (["hal=jax", "hal.attention=flash"], ["hal.attention", "'flash'", "cudnn"]),
    (["hal=jax", "hal.attention=cudnn"], ["hal.attention=cudnn", "gpu", "bf16"]),
])
def test_bad_input_is_one_line(tmp_path, args, needles):
    r = cli("launch.train", *args, f"run_dir={tmp_path}/run")
    _fails_cleanly(r, *needles)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    r = cli("launch.train", "hal=jax", "trainer.steps=4", "trainer.checkpoint_every=2", "trainer.seq_len=32",
            f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def _snapshot(path):
    """Every file's mtime, except Hydra's record of the latest launch, the log and the run dir's lock (which
    names the launch holding it: a launch takes it before it may read the checkpoints it then refuses)."""
    return {p: p.stat().st_mtime_ns for p in path.rglob("*")
            if ".hydra" not in p.parts and p.suffix != ".log" and p.name != ".lock"}


def test_checkpoint_of_another_model_shape_is_refused(tiny_run, tmp_path):
    before = _snapshot(tiny_run)
    r = cli("launch.train", "hal=torch", "model.hidden_size=64", "trainer.steps=8", "trainer.seq_len=32",
            f"run_dir={tiny_run}")
    _fails_cleanly(r, "another model", "hidden_size")
    r = cli("launch.train", "hal=torch", "model.num_hidden_layers=2", "trainer.seq_len=32",
            f"trainer.init_from={tiny_run}/checkpoints/4", f"run_dir={tmp_path}/new")
    _fails_cleanly(r, "another model", "num_hidden_layers")
    assert _snapshot(tiny_run) == before


def test_run_dir_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    r = cli("launch.train", "trainer.steps=2", f"run_dir={tmp_path / 'mine'}")
    _fails_cleanly(r, "not a trichip run")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir() if p.name != ".hydra" and
                  not p.name.endswith(".log")) == ["thesis.tex"]


def test_init_from_something_that_is_not_a_checkpoint(tmp_path):
    r = cli("launch.train", "trainer.steps=2", f"trainer.init_from={ROOT / 'configs'}", f"run_dir={tmp_path}/r")
    _fails_cleanly(r, "not a trichip checkpoint")


def test_resume_after_the_end_does_nothing_and_keeps_the_checkpoint(tiny_run):
    last = tiny_run / "checkpoints" / "4"
    before = _snapshot(last)
    r = cli("launch.train", "hal=torch", "trainer.steps=4", "trainer.seq_len=32", f"run_dir={tiny_run}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _snapshot(last) == before
    assert len(metrics(tiny_run)) == 4


def test_tensorboard_and_mfu(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    r = cli("launch.train", "hal=jax", "trainer.steps=6", "trainer.eval_every=3", "trainer.seq_len=32",
            "trainer.peak_tflops=0.44", "trainer.log_every=3", f"run_dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = metrics(tmp_path / "run")
    # MFU = model FLOPs per token * tokens/s / (peak per device * devices), from what the run recorded
    written = json.loads((tmp_path / "run" / "run.json").read_text())
    model, devices = LlamaConfig.from_dict(written["model"]), written["first_writer"]["device_count"]
    assert devices == 1 and len(rows) == 6
    for m in rows:
        expected = flops_per_token(model, 32) * m["tokens_per_s"] / (0.44e12 * devices)
        assert m["mfu"] > 0 and m["mfu"] == pytest.approx(expected, rel=1e-9), m
    log = (tmp_path / "run" / "train.log").read_text()
    for m in (rows[2], rows[5]):                            # the logged steps (log_every=3)
        assert f"step {m['step']}/6 | loss {m['loss']:.4f}" in log and f"MFU {100 * m['mfu']:.1f}%" in log
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))
    assert [round(e.value, 5) for e in events.Scalars("train/loss")] == [round(m["loss"], 5) for m in rows]
    assert [e.value for e in events.Scalars("train/mfu")] == pytest.approx([m["mfu"] for m in rows], rel=1e-6)
