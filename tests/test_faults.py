"""Faults injected into real training runs: what trichip guarantees about checkpoints when storage misbehaves.

Every test starts from checkpoints known to be good, injects one fault (a lock held by another run, damaged
files, permissions root cannot override, a full disk, an object store that resets connections or stalls behind
tests.faultlib.FaultProxy, kill -9), and asserts that every checkpoint good before the fault is still there and
verifies (launch.convert verify) afterwards, and that training resumes where it should: bitwise equal to an
uninterrupted run on the same framework, within tests.tolerances.LOSS_RTOL on the other.

The runs use a constant learning-rate schedule, so a run that ended at step 10 and the same command with a
larger trainer.steps continue exactly as one uninterrupted run does. They share a persistent XLA compile cache
(the same compiled programs, bitwise the same results) to keep the file fast.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import faultlib
from tests.conftest import ROOT, metrics
from tests.faultlib import FaultProxy, flip_byte, largest_tensor_file, tree_digest, wait_for
from tests.tolerances import LOSS_RTOL

try:
    from tests.test_object_store import BUCKET, s3  # noqa: F401  (s3: the moto server fixture)
except pytest.skip.Exception as e:       # boto3 or moto missing: only the object-store tests are skipped
    BUCKET, _why = "", str(e)

    @pytest.fixture(scope="module")
    def s3():
        pytest.skip(_why)

TINY = ["trainer.global_batch=4", "trainer.seq_len=32", "trainer.eval_every=0", "optim.lr=5e-4",
        "optim.schedule=constant", "trainer.log_every=5", "trainer.tensorboard=false", "trainer.checkpoint_every=5"]
REF_STEPS, BASE_STEPS = 30, 10


# -- running trainings ----------------------------------------------------------------------------------

class Training:
    """`python -m launch.train hal=FW TINY... ARGS run_dir=RUN` as a process; its output goes to files (a pipe
    nobody reads would stall it)."""

    def __init__(self, run_dir: Path, *args: str, fw: str = "jax", env: dict | None = None, prefix=()):
        self.run_dir = Path(run_dir)
        out = self.run_dir.parent / f".{self.run_dir.name}-{time.time_ns()}"
        self.out_path, self.err_path = out.with_suffix(".out"), out.with_suffix(".err")
        self.cmd = [*prefix, sys.executable, "-m", "launch.train", f"hal={fw}", *TINY, *args, f"run_dir={run_dir}"]
        self.t0 = time.time()
        with open(self.out_path, "w") as o, open(self.err_path, "w") as e:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), stdout=o, stderr=e)
        self.returncode = None

    def wait(self, timeout: float = 300) -> "Training":
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{' '.join(self.cmd)} still ran after {timeout}s:\n{self.output[-3000:]}") from None
        self.elapsed = time.time() - self.t0
        return self

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def ok(self) -> "Training":
        assert self.returncode == 0, (self.returncode, self.output[-4000:])
        return self

    def error_line(self, code: int) -> str:
        """The one `error: ...` line of a run that exited with `code`."""
        assert self.returncode == code, (self.returncode, self.output[-4000:])
        lines = [ln for ln in self.stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in self.stderr, self.output[-4000:]
        return lines[0]


def train(run_dir, *args, timeout: float = 300, **kw) -> Training:
    return Training(run_dir, *args, **kw).wait(timeout)


def together(*trainings: Training, timeout: float = 300) -> list[Training]:
    return [t.wait(timeout) for t in trainings]


# -- what the tests check ---------------------------------------------------------------------------------

def steps_of(root) -> list[int]:
    """Complete checkpoints (with a manifest) under a local checkpoints directory."""
    root = Path(root)
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "manifest.json").is_file()) \
        if root.is_dir() else []


def verify(ckpt) -> str:
    """`python -m launch.convert verify CKPT` (its main, in this process: no interpreter start per checkpoint)
    must pass; returns what it printed."""
    from launch import convert
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = convert.main(["verify", str(ckpt)])
    assert rc == 0 and out.getvalue().startswith("OK: "), (ckpt, rc, out.getvalue())
    return out.getvalue()


def good_checkpoints(root, only=None) -> dict[int, dict]:
    """{step: file digests} of the complete checkpoints under root (those in `only`), each verified first."""
    out = {}
    for step in only or steps_of(root):
        verify(Path(root) / str(step))
        out[step] = tree_digest(Path(root) / str(step))
    return out


def still_good(before: dict[int, dict], root) -> None:
    """Every checkpoint of `before` is still under root, byte for byte, and verifies."""
    for step, files in before.items():
        assert tree_digest(Path(root) / str(step)) == files, f"checkpoint {step} changed"
        verify(Path(root) / str(step))


def losses(run) -> np.ndarray:
    return np.array([m["loss"] for m in metrics(run)], dtype=np.float64)


def continues(run, ref, upto: int, bitwise_until: int | None = None) -> None:
    """run's metrics hold steps 1..upto, equal to ref's bitwise (up to `bitwise_until`, then within LOSS_RTOL)."""
    assert [m["step"] for m in metrics(run)] == list(range(1, upto + 1))
    got, want = losses(run), losses(ref)[:upto]
    cut = upto if bitwise_until is None else bitwise_until
    np.testing.assert_array_equal(got[:cut], want[:cut])
    if cut < upto:
        assert (np.abs(got[cut:] - want[cut:]) / np.abs(want[cut:])).max() <= LOSS_RTOL


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def run_record(run) -> dict:
    return json.loads((Path(run) / "run.json").read_text())


# -- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """One persistent XLA compile cache for the runs of this file (each run compiles the same programs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("xla-cache")))
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ref: an uninterrupted JAX run of REF_STEPS steps, every checkpoint kept (5, 10, ... 30);
    base: the same command with trainer.steps=BASE_STEPS, checkpoints 5 and 10 (copied, never changed)."""
    root = tmp_path_factory.mktemp("runs")
    ref, base = root / "ref", root / "base"
    together(Training(ref, f"trainer.steps={REF_STEPS}", "trainer.keep_checkpoints=10"),
             Training(base, f"trainer.steps={BASE_STEPS}", "trainer.keep_checkpoints=10"))
    for r in (ref, base):
        assert steps_of(r / "checkpoints") == list(range(5, (REF_STEPS if r == ref else BASE_STEPS) + 1, 5)), r
    return {"ref": ref, "base": base}


# -- locks ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_runs_racing_on_one_run_dir_one_proceeds(runs, tmp_path):
    """Both start at once on an existing run dir: one resumes it to the end, the other exits 2 with one line,
    and the resolved config in .hydra/ is the one of the run that holds the lock."""
    run = copy_run(runs["base"], tmp_path / "run")
    good = good_checkpoints(run / "checkpoints")
    keep = "trainer.keep_checkpoints=10"
    a, b = together(Training(run, "trainer.steps=20", keep, "trainer.log_every=3"),
                    Training(run, "trainer.steps=20", keep, "trainer.log_every=4"))
    (winner, log_every), loser = ((a, 3), b) if a.returncode == 0 else ((b, 4), a)
    winner.ok()
    line = loser.error_line(2)
    assert "in use by another run" in line and f"pid {winner.proc.pid}" in line, line
    assert f"log_every: {log_every}\n" in (run / ".hydra" / "config.yaml").read_text()
    continues(run, runs["ref"], 20)
    still_good(good, run / "checkpoints")
    for step in (15, 20):
        verify(run / "checkpoints" / str(step))


@pytest.mark.slow
def test_a_run_refused_on_a_new_run_dir_leaves_the_owners_config(runs, tmp_path):
    """Two runs on a run dir that does not exist yet, the second one's precheck done before the first made the
    directory: the first trains, the second exits 2, and .hydra/config.yaml is the first one's. The order is
    forced, not raced: the second stops where it would create the directory until the first holds the lock
    (and is paused there until the second has tried)."""
    run = tmp_path / "run"
    env, reached, release = faultlib.mkdir_gate(tmp_path, run)
    late = Training(run, "trainer.steps=5", "trainer.log_every=4", env=env)
    wait_for(reached.exists, 120, "the second run's mkdir of the run dir", late.proc)
    first = Training(run, "trainer.steps=5", "trainer.log_every=3")
    wait_for(lambda: (run / "run.json").exists(), 120, "the first run to take the run dir", first.proc)
    first.proc.send_signal(signal.SIGSTOP)      # holding the lock until the second one has tried
    try:
        release.touch()
        late.wait()
    finally:
        first.proc.send_signal(signal.SIGCONT)
    first.wait().ok()
    assert "in use by another run" in late.error_line(2)
    assert "log_every: 3\n" in (run / ".hydra" / "config.yaml").read_text()
    continues(run, runs["ref"], 5)


@pytest.mark.slow
def test_two_runs_racing_on_one_checkpoint_dir_one_proceeds(runs, tmp_path):
    """Two run dirs, one external trainer.checkpoint_dir on a disk, started at once: one trains and owns the
    directory (owner.json), the other exits 2; a third run dir later is refused by the owner record and
    changes nothing there; the owner resumes from it."""
    shared = tmp_path / "shared"
    args = ("trainer.steps=5", f"trainer.checkpoint_dir={shared}")
    a, b = together(Training(tmp_path / "a", *args), Training(tmp_path / "b", *args))
    winner, loser = (a, b) if a.returncode == 0 else (b, a)
    winner.ok()
    line = loser.error_line(2)
    assert str(shared) in line and ("in use by another run" in line or "belongs to another run" in line), line
    owner = json.loads((shared / "owner.json").read_text())
    assert owner["run_dir"] == str(winner.run_dir.resolve()) and owner["run_id"] == run_record(winner.run_dir)["run_id"]
    assert steps_of(shared) == [5]
    verify(shared / "5")
    before = tree_digest(shared, skip=(".lock",))
    line = train(tmp_path / "c", *args).error_line(2)
    assert "belongs to another run" in line and str(winner.run_dir.resolve()) in line, line
    assert tree_digest(shared, skip=(".lock",)) == before
    t = train(winner.run_dir, "trainer.steps=10", f"trainer.checkpoint_dir={shared}").ok()
    assert f"start at step 5 from {shared}/5 " in t.stdout
    continues(winner.run_dir, runs["ref"], 10)
    verify(shared / "5")
    verify(shared / "10")


# -- proven damage ----------------------------------------------------------------------------------------

def _plant_damage(run: Path, ref: Path) -> dict[int, str]:
    """Checkpoints 15..35 next to the good 5 and 10, each damaged in one provable way (copies of the reference
    run's checkpoints, so they carry this lineage). Returns {step: the damage}."""
    ckpts, src = run / "checkpoints", ref / "checkpoints"
    for step, origin in ((15, 15), (20, 20), (25, 25), (30, 30), (35, 30)):
        shutil.copytree(src / str(origin), ckpts / str(step))
    flip_byte(largest_tensor_file(ckpts / "15"))
    shutil.rmtree(ckpts / "20" / "state" / "params.model.norm.weight")
    manifest = (ckpts / "25" / "manifest.json").read_text()
    (ckpts / "25" / "manifest.json").write_text(manifest[: len(manifest) // 2])
    m = json.loads((ckpts / "30" / "manifest.json").read_text())
    del m["tensors"]
    (ckpts / "30" / "manifest.json").write_text(json.dumps(m))
    (ckpts / "35" / "manifest.json").unlink()
    return {15: "digest mismatch", 20: "missing tensor", 25: "manifest cut short", 30: "manifest without tensors",
            35: "manifest deleted"}


@pytest.mark.slow
def test_proven_damage_is_skipped_newest_first_and_replaced(runs, tmp_path):
    """Five damaged checkpoints newer than the good 10: each is named in a warning and skipped, the run resumes
    from 10 bitwise, replaces 15 and 20 when it gets there and leaves the ones past its end alone. With
    trainer.strict_resume=true the same directory stops at the newest damaged one (exit 2), changing nothing."""
    run, strict = tmp_path / "run", tmp_path / "strict"
    for r in (run, strict):
        copy_run(runs["base"], r)
        damage = _plant_damage(r, runs["ref"])
    good = good_checkpoints(run / "checkpoints", only=(5, 10))
    untouched = {s: tree_digest(run / "checkpoints" / str(s)) for s in (25, 30, 35)}
    strict_before = tree_digest(strict / "checkpoints"), (strict / "metrics.jsonl").read_bytes()
    t, s = together(Training(run, "trainer.steps=20", "trainer.keep_checkpoints=10"),
                    Training(strict, "trainer.steps=20", "trainer.strict_resume=true"))
    t.ok()
    warnings = [ln for ln in t.stdout.splitlines() if "falling back to the previous checkpoint" in ln]
    named = [int(re.search(r"checkpoints/(\d+)", ln).group(1)) for ln in warnings]
    assert named == [35, 30, 25, 20, 15], (damage, warnings)
    assert f"start at step 10 from {run}/checkpoints/10 " in t.stdout
    continues(run, runs["ref"], 20)
    assert steps_of(run / "checkpoints") == [5, 10, 15, 20, 25, 30]
    still_good(good, run / "checkpoints")
    for step in (15, 20):
        verify(run / "checkpoints" / str(step))
        assert json.loads((run / "checkpoints" / str(step) / "manifest.json").read_text())["step"] == step
    assert {st: tree_digest(run / "checkpoints" / str(st)) for st in (25, 30, 35)} == untouched

    line = s.error_line(2)
    assert f"{strict}/checkpoints/35" in line and "manifest.json" in line, line
    assert (tree_digest(strict / "checkpoints"), (strict / "metrics.jsonl").read_bytes()) == strict_before


@pytest.mark.slow
def test_every_checkpoint_damaged_stops_unless_fresh_if_damaged(runs, tmp_path):
    """No good checkpoint left: exit 2 and nothing changed; with trainer.fresh_if_damaged=true the run starts
    from the reference init (the uninterrupted run's losses from step 1) and replaces both."""
    run = copy_run(runs["base"], tmp_path / "run")
    flip_byte(largest_tensor_file(run / "checkpoints" / "5"))
    (run / "checkpoints" / "10" / "manifest.json").unlink()
    before = tree_digest(run / "checkpoints"), (run / "metrics.jsonl").read_bytes()
    line = train(run, "trainer.steps=10").error_line(2)
    assert "every checkpoint" in line and "(10, 5)" in line and "fresh_if_damaged" in line, line
    assert (tree_digest(run / "checkpoints"), (run / "metrics.jsonl").read_bytes()) == before
    t = train(run, "trainer.steps=10", "trainer.fresh_if_damaged=true").ok()
    assert "start at step 0 from reference init" in t.stdout
    continues(run, runs["ref"], 10)
    assert steps_of(run / "checkpoints") == [5, 10]
    for step in (5, 10):
        verify(run / "checkpoints" / str(step))


@pytest.mark.slow
def test_keep_1_never_prunes_for_a_damaged_newer_checkpoint(runs, tmp_path):
    """keep_checkpoints=1 and a damaged 20 (a good copy with one byte flipped): the 15 the run writes is kept
    while the damaged 20 is there (seen with the run paused at a step between 16 and 19), and 20 is
    replaced when the run reaches it."""
    run = copy_run(runs["base"], tmp_path / "run")
    shutil.copytree(runs["ref"] / "checkpoints" / "20", run / "checkpoints" / "20")
    flip_byte(largest_tensor_file(run / "checkpoints" / "20"))
    planted = tree_digest(run / "checkpoints" / "20")
    t = Training(run, "trainer.steps=20", "trainer.keep_checkpoints=1", "trainer.async_save=false")
    last = wait_for(lambda: _last_step(run) if _last_step(run) >= 16 else 0, 120, "step 16", t.proc, every=0.002)
    t.proc.send_signal(signal.SIGSTOP)
    try:
        assert last < 20, f"the run was at step {last} before it could be paused"
        assert steps_of(run / "checkpoints") == [15, 20]
        verify(run / "checkpoints" / "15")
        assert tree_digest(run / "checkpoints" / "20") == planted
    finally:
        t.proc.send_signal(signal.SIGCONT)
    t.wait().ok()
    assert "checkpoints/20" in t.stdout and "falling back to the previous checkpoint" in t.stdout
    continues(run, runs["ref"], 20)
    assert steps_of(run / "checkpoints") == [20]
    verify(run / "checkpoints" / "20")
    lineage = json.loads((run / "checkpoints" / "20" / "manifest.json").read_text())["lineage"]
    assert lineage["run_id"] == run_record(run)["run_id"]


def _last_step(run) -> int:
    try:
        return metrics(run)[-1]["step"]
    except (FileNotFoundError, IndexError, json.JSONDecodeError):
        return 0


# -- storage that cannot be read or written ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fw,target", [("torch", "state"), ("jax", "manifest.json")])
def test_unreadable_checkpoint_stops_exit_3_then_resumes(runs, tmp_path, fw, target):
    """chmod 000 on the newest checkpoint's state/ (or manifest.json), read by a process without
    CAP_DAC_OVERRIDE: exit 3 naming it, nothing changed, not skipped as damaged; with the mode restored the
    same command resumes from it (bitwise on JAX, within LOSS_RTOL on PyTorch)."""
    why = faultlib.root_is_denied(tmp_path / "probe")
    if why:
        pytest.skip(why)
    run = copy_run(runs["base"], tmp_path / "run")
    good = good_checkpoints(run / "checkpoints")
    metrics_before = (run / "metrics.jsonl").read_bytes()
    locked = run / "checkpoints" / "10" / target
    mode = locked.stat().st_mode & 0o777
    locked.chmod(0)
    try:
        t = train(run, "trainer.steps=20", fw=fw, prefix=faultlib.DROP_DAC)
    finally:
        locked.chmod(mode)
    line = t.error_line(3)
    assert "checkpoints/10" in line and ("cannot be read" in line or "cannot read" in line), line
    assert "falling back" not in t.output
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    still_good(good, run / "checkpoints")
    t = train(run, "trainer.steps=20", fw=fw, prefix=faultlib.DROP_DAC).ok()
    assert f"start at step 10 from {run}/checkpoints/10 " in t.stdout
    continues(run, runs["ref"], 20, bitwise_until=10 if fw == "torch" else None)


@pytest.mark.slow
def test_full_disk_stops_exit_3_keeps_checkpoints_then_resumes(runs, tmp_path):
    """The run's disk (a tmpfs) has room for a few MiB more than the run dir holds: the save at 15 fails with
    exit 3 naming it, 5 and 10 are intact and no temp directory is left; once the disk is larger the same
    command resumes from 10 and matches the uninterrupted run bitwise."""
    disk = tmp_path / "disk"
    size_kib = sum(p.stat().st_size for p in runs["base"].rglob("*") if p.is_file()) // 1024 + 4096
    with faultlib.tmpfs(disk, f"{size_kib}k") as resize:
        run = copy_run(runs["base"], disk / "run")
        good = good_checkpoints(run / "checkpoints")
        line = train(run, "trainer.steps=20").error_line(3)
        assert "checkpoint at step 15 failed (No space left on device)" in line and "latest: 10" in line, line
        still_good(good, run / "checkpoints")
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "5"]
        resize("200m")
        t = train(run, "trainer.steps=20").ok()
        assert f"start at step 10 from {run}/checkpoints/10 " in t.stdout
        continues(run, runs["ref"], 20)
        for step in (15, 20):
            verify(run / "checkpoints" / str(step))


@pytest.mark.slow
def test_every_save_failing_with_continue_says_so_and_metrics_stay_json(tmp_path):
    """trainer.on_save_error=continue on a disk too small for any checkpoint, and every update non-finite
    (optim.lr=1e30, trainer.on_nonfinite=skip): exit 0, an ERROR line saying the run wrote no checkpoint,
    run.json's last_run with the failures and no latest checkpoint, and metrics.jsonl strict JSON (null, not
    NaN)."""
    run = tmp_path / "disk" / "run"
    with faultlib.tmpfs(run.parent, "2m"):
        t = train(run, "trainer.steps=10", "trainer.on_save_error=continue", "trainer.on_nonfinite=skip",
                  "optim.lr=1e30", "optim.warmup_steps=0").ok()
        errors = [ln for ln in t.stdout.splitlines() if "[ERROR]" in ln]
        assert any("wrote no checkpoint" in ln for ln in errors), t.output[-3000:]
        last = run_record(run)["last_run"]
        assert len(last["checkpoint_failures"]) == 2 and last["latest_checkpoint"] is None
        assert last["checkpoints_written"] == [] and steps_of(run / "checkpoints") == []

        def no_bare_constants(name):
            raise AssertionError(f"metrics.jsonl holds a bare {name}")
        rows = [json.loads(ln, parse_constant=no_bare_constants) for ln in
                (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 11))
        assert any(r.get("skipped") and None in (r["loss"], r["grad_norm"]) for r in rows), rows


# -- settings -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_false_and_changed_settings_are_refused(runs, tmp_path):
    """trainer.resume=false, another seed or another data.path on a run dir with checkpoints: exit 2, nothing
    changed; trainer.allow_setting_changes=true lets the changed seed through."""
    from trainer.prepare import Options, build
    text = tmp_path / "other.txt"
    text.write_text(" ".join(map(str, np.random.default_rng(0).integers(0, 1000, 5000))))
    tokens = tmp_path / "other"
    build(tokens, Options(inputs=[str(text)], progress=False))
    changes = {"resume": ["trainer.resume=false"], "seed": ["seed=1"], "data": ["data=tokens", f"data.path={tokens}"]}
    copies = {k: copy_run(runs["base"], tmp_path / k) for k in changes}
    before = {k: (tree_digest(r / "checkpoints"), (r / "metrics.jsonl").read_bytes()) for k, r in copies.items()}
    refused = dict(zip(changes, together(*(Training(copies[k], "trainer.steps=20", *a) for k, a in changes.items()))))
    assert "already holds checkpoints and trainer.resume=false" in refused["resume"].error_line(2)
    assert "seed 0 -> 1" in refused["seed"].error_line(2)
    assert f"data.path 'builtin:python_docs' -> '{tokens}'" in refused["data"].error_line(2)
    for k, r in copies.items():
        assert (tree_digest(r / "checkpoints"), (r / "metrics.jsonl").read_bytes()) == before[k], k
    t = train(copies["seed"], "trainer.steps=12", "seed=1", "trainer.allow_setting_changes=true").ok()
    assert "start at step 10 from" in t.stdout and [m["step"] for m in metrics(copies["seed"])][-1] == 12


@pytest.mark.slow
def test_changed_checkpoint_dir_is_refused(runs, tmp_path):
    """Another trainer.checkpoint_dir on a run dir whose checkpoints are in run_dir/checkpoints: exit 2,
    nothing changed, nothing written at the new place."""
    run, elsewhere = copy_run(runs["base"], tmp_path / "run"), tmp_path / "elsewhere"
    before = tree_digest(run / "checkpoints"), (run / "metrics.jsonl").read_bytes(), run_record(run)["settings"]
    t = train(run, "trainer.steps=12", f"trainer.checkpoint_dir={elsewhere}")
    assert not steps_of(elsewhere) and run_record(run)["settings"] == before[2]
    assert f"checkpoint_dir None -> '{elsewhere}'" in t.error_line(2)
    assert (tree_digest(run / "checkpoints"), (run / "metrics.jsonl").read_bytes()) == before[:2]


@pytest.mark.slow
def test_an_existing_empty_run_dir_starts_a_run(runs, tmp_path):
    """A run dir that exists and is empty (a mount point, a directory a job script made) is a new run, though
    launch.train's precheck puts its lock file there before the run looks at it."""
    run = tmp_path / "run"
    run.mkdir()
    train(run, "trainer.steps=5").ok()
    continues(run, runs["ref"], 5)


# -- kill -9 ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_during_saves_with_keep_1_always_leaves_a_good_checkpoint(runs, tmp_path):
    """A checkpoint every step, keep_checkpoints=1, SIGKILL as soon as a save is under way (a .tmp-<step>
    directory exists) at a random moment of it: after every kill the newest complete checkpoint is at least
    as new as the newest one before, and verifies; the resumed run ends bitwise equal to the uninterrupted one."""
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    rng = random.Random(0)
    args = ("trainer.steps=20", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=1")
    newest, kills = 0, 0
    while kills < 4:
        t = Training(run, *args)
        try:
            wait_for(lambda: _saving(ckpts) > newest, 120, "a save", t.proc, every=0.002)
        except AssertionError:
            t.wait().ok()          # it finished before a save could be caught
            break
        time.sleep(rng.uniform(0, 0.05))
        t.proc.send_signal(signal.SIGKILL)
        t.wait()
        kills += 1
        complete = steps_of(ckpts) or [0]
        assert complete[-1] >= newest, (newest, sorted(p.name for p in ckpts.iterdir()))
        if complete[-1]:
            verify(ckpts / str(complete[-1]))
        newest = complete[-1]
    assert kills >= 3, f"only {kills} kills landed during a save"
    train(run, *args).ok()
    continues(run, runs["ref"], 20)
    assert steps_of(ckpts) == [20] and not [p for p in ckpts.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    verify(ckpts / "20")


def _saving(ckpts: Path) -> int:
    """The step of a save under way (its .tmp-<step> directory exists), 0 if none."""
    try:
        names = [p.name for p in ckpts.iterdir()]
    except FileNotFoundError:
        return 0
    return max([int(m.group(1)) for m in map(re.compile(r"\.tmp-(\d+)").fullmatch, names) if m], default=0)


# -- object stores behind a faulty network ------------------------------------------------------------------

def test_fault_proxy_cuts_stalls_delays_and_triggers(tmp_path):
    """The proxy itself, in front of a local HTTP server: relays, resets, stalls until the client's timeout,
    delays, and switches on a request line for a while."""
    import http.server
    import threading
    import urllib.request

    class Hello(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def get(proxy, path="/x"):
        t0 = time.time()
        try:
            return urllib.request.urlopen(proxy.url + path, timeout=1.0).read(), time.time() - t0
        except OSError as e:
            return type(e).__name__, time.time() - t0
    try:
        with FaultProxy(server.server_address) as p:
            assert get(p)[0] == b"hello"
            p.cut()
            assert get(p)[0] in ("URLError", "ConnectionResetError", "RemoteDisconnected")
            p.stall()
            body, took = get(p)
            assert body != b"hello" and took >= 0.9
            p.delay(0.3)
            body, took = get(p)
            assert body == b"hello" and took >= 0.3
            p.restore()
            p.cut_on(r"^GET /state/", for_s=0.5)
            assert get(p, "/before")[0] == b"hello"
            assert get(p, "/state/x")[0] != b"hello"
            assert get(p, "/during")[0] != b"hello"
            time.sleep(0.6)
            assert get(p, "/after")[0] == b"hello"
            assert p.met("cut") == [("GET", "/state/x")] and p.faulted >= 3
    finally:
        server.shutdown()


STORE_PREFIX = "faults"


@pytest.fixture(scope="module")
def proxy(s3):
    """A FaultProxy in front of the s3 fixture's server (whose address is in AWS_ENDPOINT_URL)."""
    host, port = os.environ["AWS_ENDPOINT_URL"].split("://", 1)[1].rsplit(":", 1)
    with FaultProxy((host, int(port))) as p:
        yield p


@pytest.fixture
def healthy(proxy):
    """The proxy relaying normally, no trigger armed, no requests recorded; the same again afterwards."""
    proxy.restore()
    proxy.disarm()
    yield proxy
    proxy.restore()
    proxy.disarm()


@pytest.fixture(scope="module")
def s3_base(s3, tmp_path_factory):
    """A JAX run with its checkpoints on s3 (5 and 10, keep all), written through a healthy connection."""
    run = tmp_path_factory.mktemp("s3") / "run"
    train(run, f"trainer.steps={BASE_STEPS}", "trainer.keep_checkpoints=10",
          f"trainer.checkpoint_dir=s3://{BUCKET}/{STORE_PREFIX}").ok()
    return run


def store_objects(s3) -> dict[str, str]:
    """{key: ETag} under the test prefix: what "nothing changed on the store" means."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=STORE_PREFIX + "/"):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def complete_objects(s3) -> dict[str, str]:
    """{key: ETag} of the complete checkpoints under the test prefix: what a later successful run must keep."""
    steps = store_steps(s3)
    return {k: v for k, v in store_objects(s3).items() if k.split("/")[1].isdigit() and int(k.split("/")[1]) in steps}


def store_steps(s3) -> list[int]:
    """Steps of the complete checkpoints (with a manifest) under the test prefix."""
    return sorted(int(k.split("/")[1]) for k in store_objects(s3)
                  if re.fullmatch(rf"{STORE_PREFIX}/\d+/manifest.json", k))


def via(proxy, attempts: int, timeout: float) -> dict:
    return {"AWS_ENDPOINT_URL": proxy.url, "TRICHIP_STORE_ATTEMPTS": str(attempts),
            "TRICHIP_STORE_TIMEOUT": str(timeout)}


def _on_store(s3_base, steps: int, *args, **kw) -> Training:
    return Training(s3_base, f"trainer.steps={steps}", "trainer.keep_checkpoints=10",
                    f"trainer.checkpoint_dir=s3://{BUCKET}/{STORE_PREFIX}", *args, **kw)


TENSOR_GET = rf"^GET /{BUCKET}/{STORE_PREFIX}/\d+/state/"


@pytest.mark.slow
def test_store_outage_longer_than_the_retries_stops_exit_3_then_resumes(s3, s3_base, runs, healthy):
    """The store starts resetting every connection at the first tensor download of the resume and stays down:
    exit 3 after 2 attempts, one line, the store's objects and metrics.jsonl untouched; once it is back the
    same command resumes from the newest checkpoint, bitwise."""
    newest = store_steps(s3)[-1]
    objects, metrics_before = store_objects(s3), (s3_base / "metrics.jsonl").read_bytes()
    healthy.cut_on(TENSOR_GET)
    t = _on_store(s3_base, newest + 5, env=via(healthy, 2, 5)).wait()
    line = t.error_line(3)
    assert healthy.met("cut") and f"s3://{BUCKET}/{STORE_PREFIX}/{newest}" in line, (healthy.requests[-5:], line)
    assert "attempt 1 of 2; retrying" in t.stdout
    assert store_objects(s3) == objects and (s3_base / "metrics.jsonl").read_bytes() == metrics_before
    for step in store_steps(s3):
        verify(f"s3://{BUCKET}/{STORE_PREFIX}/{step}")
    healthy.restore()
    t = _on_store(s3_base, newest + 5, env=via(healthy, 2, 5)).wait().ok()
    assert f"start at step {newest} from s3://{BUCKET}/{STORE_PREFIX}/{newest} " in t.stdout
    continues(s3_base, runs["ref"], newest + 5)
    verify(f"s3://{BUCKET}/{STORE_PREFIX}/{newest + 5}")


@pytest.mark.slow
def test_store_outage_of_2s_during_resume_is_ridden_out(s3, s3_base, runs, healthy):
    """A 2 s outage from the first tensor download: the retries (4 attempts, backoff 0.5, 1, 2 s) carry the
    resume through it, from the newest checkpoint, and training continues bitwise."""
    newest = store_steps(s3)[-1]
    objects = complete_objects(s3)
    healthy.cut_on(TENSOR_GET, for_s=2.0)
    t = _on_store(s3_base, newest + 5, env=via(healthy, 4, 5)).wait().ok()
    assert healthy.met("cut") and "retrying" in t.stdout, healthy.requests[-5:]
    assert f"start at step {newest} from s3://{BUCKET}/{STORE_PREFIX}/{newest} " in t.stdout
    continues(s3_base, runs["ref"], newest + 5)
    assert store_steps(s3)[-1] == newest + 5
    assert {k: v for k, v in store_objects(s3).items() if k in objects} == objects
    for step in store_steps(s3):
        verify(f"s3://{BUCKET}/{STORE_PREFIX}/{step}")


# A stalled call gives up after attempts x 2 boto3 tries x timeout + backoff (2 x 2 x 2 s + 0.5 s = 8.5 s here);
# a failing run makes a few such calls before it exits (the failed transfer, the listing that names the latest
# checkpoint). 40 s is generous for that and far from the minutes a wait per file or per retry loop would take.
ATTEMPTS, TIMEOUT = 2, 2.0
STALL_BOUND = 40.0


def _ends_within(t: Training, since: float, bound: float) -> float:
    """Wait for the process until `bound` s after `since`; past it the process is killed and the test fails.
    Returns how long after `since` it ended."""
    try:
        t.wait(timeout=max(1.0, since + bound - time.time()))
    except AssertionError:
        raise AssertionError(f"still running {bound}s after the fault (killed): {t.output[-1500:]}") from None
    return time.time() - since


@pytest.mark.slow
@pytest.mark.parametrize("where", ["start", "download"])
def test_stalling_store_fails_within_attempts_x_timeout(s3, s3_base, healthy, where):
    """A store that accepts connections and never answers (from the start, or from the first tensor download
    on): the run fails with exit 3 within STALL_BOUND s of the stall (attempts=2, timeout=2 s), not minutes,
    after retrying (more than attempts x timeout), and changes nothing."""
    newest = store_steps(s3)[-1]
    objects, metrics_before = store_objects(s3), (s3_base / "metrics.jsonl").read_bytes()
    if where == "start":
        healthy.stall()
    else:
        healthy.cut_on(TENSOR_GET, mode="stall")
    t = _on_store(s3_base, newest + 5, env=via(healthy, ATTEMPTS, TIMEOUT))
    wait_for(lambda: healthy.met("stall"), 120, "the stall", t.proc)
    took = _ends_within(t, min(when for when, mode, *_ in healthy.requests if mode == "stall"), STALL_BOUND)
    healthy.restore()
    print(f"stalled store ({where}): the run ended {took:.1f}s after the stall (bound {STALL_BOUND}s)")
    line = t.error_line(3)
    assert f"s3://{BUCKET}" in line and took > ATTEMPTS * TIMEOUT, (took, line)     # it did retry
    assert store_objects(s3) == objects and (s3_base / "metrics.jsonl").read_bytes() == metrics_before
    for step in store_steps(s3):
        verify(f"s3://{BUCKET}/{STORE_PREFIX}/{step}")


@pytest.mark.slow
def test_sigterm_during_a_stalled_upload_ends_in_bounded_time(s3, s3_base, runs, healthy):
    """The upload of the run's final checkpoint stalls; SIGTERM then ends the process within STALL_BOUND s
    (attempts=2, timeout=2 s) with a non-zero exit, the earlier checkpoints intact and no partial one
    visible; the same command afterwards writes it and matches the uninterrupted run."""
    newest = store_steps(s3)[-1]
    end = newest + 5
    healthy.cut_on(rf"^PUT /{BUCKET}/{STORE_PREFIX}/{end}/", mode="stall")
    t = _on_store(s3_base, end, env=via(healthy, ATTEMPTS, TIMEOUT))
    wait_for(lambda: healthy.met("stall"), 180, "the stalled upload", t.proc)
    t.proc.send_signal(signal.SIGTERM)
    took = _ends_within(t, time.time(), STALL_BOUND)
    print(f"SIGTERM during a stalled upload: the process ended {took:.1f}s later (bound {STALL_BOUND}s)")
    healthy.restore()
    assert t.returncode != 0, t.output[-3000:]
    assert store_steps(s3)[-1] == newest
    for step in store_steps(s3):
        verify(f"s3://{BUCKET}/{STORE_PREFIX}/{step}")
    t = _on_store(s3_base, end, env=via(healthy, ATTEMPTS, TIMEOUT)).wait().ok()
    continues(s3_base, runs["ref"], end)
    verify(f"s3://{BUCKET}/{STORE_PREFIX}/{end}")


@pytest.mark.slow
def test_store_outage_during_an_upload_with_continue_names_the_latest(s3, s3_base, runs, healthy):
    """The store resets every connection from the first upload of the run's checkpoint on, with
    trainer.on_save_error=continue: exit 0, the earlier checkpoints intact, nothing partial visible; the same
    command resumes from the newest and writes it. What the run reports: the save failed, and the newest
    checkpoint to resume from is the one it started from (not none)."""
    newest = store_steps(s3)[-1]
    end = newest + 5
    kept = complete_objects(s3)
    healthy.cut_on(rf"^PUT /{BUCKET}/{STORE_PREFIX}/{end}/")
    t = _on_store(s3_base, end, "trainer.on_save_error=continue", env=via(healthy, 2, 2.0)).wait()
    healthy.restore()
    t.ok()
    record, errors = run_record(s3_base)["last_run"], [ln for ln in t.stdout.splitlines() if "[ERROR]" in ln]
    assert healthy.met("cut") and record["checkpoint_failures"] and errors, t.output[-3000:]
    assert store_steps(s3)[-1] == newest
    assert {k: v for k, v in store_objects(s3).items() if k in kept} == kept
    for step in store_steps(s3):
        verify(f"s3://{BUCKET}/{STORE_PREFIX}/{step}")
    _on_store(s3_base, end, "trainer.on_save_error=continue", env=via(healthy, 2, 2.0)).wait().ok()
    continues(s3_base, runs["ref"], end)
    verify(f"s3://{BUCKET}/{STORE_PREFIX}/{end}")
    assert record["latest_checkpoint"] == newest and f"latest: {newest})" in errors[0], (record, errors)


@pytest.mark.slow
def test_second_run_dir_on_the_same_store_prefix_is_refused(s3, s3_base, tmp_path):
    """owner.json on the store names the run that writes there: another run dir is refused (exit 2)."""
    objects = store_objects(s3)
    line = _on_store(tmp_path / "other", BASE_STEPS).wait().error_line(2)
    assert "belongs to another run" in line and str(s3_base.resolve()) in line, line
    assert store_objects(s3) == objects


@pytest.mark.slow
def test_two_runs_racing_on_one_store_prefix_one_proceeds(s3, tmp_path):
    """Two run dirs on one fresh s3 prefix, started at once: the conditional put of owner.json lets exactly one
    through; the other exits 2."""
    args = ("trainer.steps=5", f"trainer.checkpoint_dir=s3://{BUCKET}/race")
    a, b = together(Training(tmp_path / "a", *args), Training(tmp_path / "b", *args))
    winner, loser = (a, b) if a.returncode == 0 else (b, a)
    winner.ok()
    assert "belongs to another run" in loser.error_line(2)
    owner = json.loads(s3.get_object(Bucket=BUCKET, Key="race/owner.json")["Body"].read())
    assert owner["run_dir"] == str(winner.run_dir.resolve())
    verify(f"s3://{BUCKET}/race/5")
