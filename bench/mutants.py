"""Semantic mutants: small hand-made errors against what the README promises, each applied alone to a
copy of the repository, where the tests that must catch it run. Every mutant must be killed.

    python bench/mutants.py                          # every mutant; a Markdown table on stdout
    python bench/mutants.py --only jax-eps-doubled   # some of them
    python bench/mutants.py --out bench/MUTANTS.md   # and the table, command and commit into a file
    python bench/mutants.py --list                   # the mutants and their tests

The copy holds the files of HEAD's commit (`git archive`: `git ls-files` at it; --worktree: the
working tree's tracked and untracked, not ignored, files instead), so /work/main itself is never
changed. A mutant is (file, old text, new text): a patch whose old text is not in the copy exactly once
stops the script before any test runs (code moves; the list here must follow it). The unmutated copy
runs every probe first and must pass: else no failure could be credited to a mutant. A mutant is
killed when a test fails on it; a mutant that breaks collection or import is reported as broken.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = "tests/test_optimizer_reference.py"
PARITY = "tests/test_parity.py::test_same_loss_curve"


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    error: str                  # the semantic error, in words
    path: str                   # the file patched, relative to the repository root
    old: str                    # must occur exactly once in that file
    new: str
    probes: tuple[str, ...]     # pytest arguments, one run each, all run (to show which tests catch it)


# Without bias correction: the Adam step times (1 - b1^t) / sqrt(1 - b2^t), i.e. m / (sqrt(v) + eps').
_NO_BIAS_CORRECTION = (
    "optax.GradientTransformation(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps).init, "
    "lambda g, s, p=None: (lambda u, s: (__import__('jax').tree.map("
    "lambda x: x * (1 - optim.b1 ** s.count) / (1 - optim.b2 ** s.count) ** 0.5, u), s))("
    "*optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps).update(g, s, p))),")

MUTANTS = [
    Mutant("torch-weight-decay-0.11", "torch's AdamW decays with 0.11 where 0.1 is asked",
           "hal/torch_backend.py", '"weight_decay": optim.weight_decay if decay else 0.0',
           '"weight_decay": optim.weight_decay * 1.1 if decay else 0.0', (PARITY, f"{REF} -k torch")),
    Mutant("jax-eps-doubled", "optax's Adam gets eps 2e-8 where 1e-8 is asked",
           "hal/jax_backend.py", "optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps)",
           "optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=2 * optim.eps)", (PARITY, f"{REF} -k jax")),
    Mutant("torch-clip-threshold-doubled", "torch clips only gradients over twice max_grad_norm",
           "hal/torch_backend.py", "over = norm > self.optim.max_grad_norm",
           "over = norm > 2 * self.optim.max_grad_norm", (f"{REF} -k torch",)),
    Mutant("jax-clip-to-double", "optax clips to twice max_grad_norm",
           "hal/jax_backend.py", "optax.clip_by_global_norm(optim.max_grad_norm)",
           "optax.clip_by_global_norm(2 * optim.max_grad_norm)", (f"{REF} -k jax",)),
    Mutant("jax-no-bias-correction", "JAX's Adam step without bias correction",
           "hal/jax_backend.py", "optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),",
           _NO_BIAS_CORRECTION, (f"{REF} -k jax",)),
    Mutant("torch-accumulation-sum", "torch sums micro-batch gradients instead of averaging them",
           "hal/torch_backend.py", "(loss / accum).backward()", "loss.backward()", (f"{REF} -k torch",)),
    Mutant("jax-accumulation-sum", "JAX sums micro-batch gradients (the loss is still averaged)",
           "hal/jax_backend.py", "return jax.tree.map(lambda x: x / tokens.shape[0], total)",
           "return total[0] / tokens.shape[0], total[1]", (f"{REF} -k jax",)),
    Mutant("decay-on-norm-gains", "weight decay on 1-D norm gains too (torch's param groups)",
           "models/spec.py", "return len(shape) == 2", "return len(shape) >= 1", (f"{REF} -k torch",)),
    Mutant("warmup-off-by-one", "the first update gets lr 0: warmup starts a step late",
           "trainer/schedule.py", "return peak_lr * (count + 1) / warmup_steps",
           "return peak_lr * count / warmup_steps", ("tests/test_schedule.py", f"{REF} -k schedule")),
    Mutant("rope-theta-both", "RoPE base doubled in the shared tables (both frameworks alike)",
           "models/spec.py", "inv = 1.0 / (cfg.rope_theta ** (", "inv = 1.0 / ((2 * cfg.rope_theta) ** (",
           ("tests/test_models.py", "tests/test_hf_convert.py -k imported_model_matches")),
    Mutant("jax-rope-theta", "RoPE base doubled in the Flax model only",
           "models/llama_jax.py", "rope_tables(cfg, tokens.shape[1])",
           "rope_tables(type(cfg)(**{**cfg.__dict__, 'rope_theta': 2 * cfg.rope_theta}), tokens.shape[1])",
           ("tests/test_models.py",)),
    Mutant("data-window-shifted", "each window starts one token after its place in the stream",
           "trainer/data.py", "start = number * self.seq_len\n", "start = number * self.seq_len + 1\n",
           ("tests/test_data.py",)),
    Mutant("data-held-out-touches-train", "the held-out windows start right after the train windows (no gap)",
           "trainer/data.py", "(seed, 1, source), self.n_train + 1)", "(seed, 1, source), self.n_train)",
           ("tests/test_data.py",)),
    Mutant("data-same-order-every-epoch", "every epoch visits the windows in the same order",
           "trainer/data.py", "sampling.permute(within[sel], count, key + (int(p),))",
           "sampling.permute(within[sel], count, key + (0,))", ("tests/test_data.py",)),
    Mutant("mixture-samples-restart", "each block of a mixture restarts its sources' sample numbers",
           "trainer/sampling.py", "sample[sel] = int(b) * self.counts[source[sel]] + rank[within[sel]]",
           "sample[sel] = rank[within[sel]]", ("tests/test_data.py",)),
]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def copy_repository(dest: Path, commit: str, worktree: bool) -> None:
    """The commit's files (or the working tree's tracked and untracked, not ignored, files) into dest."""
    if not worktree:
        tar = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True, capture_output=True)
        with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
            t.extractall(dest, filter="data")
        return
    for name in git("ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def apply(copy: Path, m: Mutant) -> None:
    path = copy / m.path
    text = path.read_text() if path.exists() else ""
    found = text.count(m.old)
    if found != 1:
        sys.exit(f"mutant {m.name}: {m.path} holds its old text {found} times, not once; bench/mutants.py must "
                 f"follow the code:\n  {m.old}")
    path.write_text(text.replace(m.old, m.new))


@dataclasses.dataclass
class Outcome:
    probe: str
    rc: int
    failed: list[str]          # "node id - reason" of each FAILED line
    errors: list[str]          # ERROR lines (collection, fixtures)
    seconds: float

    @property
    def killed(self) -> bool:
        return bool(self.failed)

    @property
    def broken(self) -> bool:
        return self.rc not in (0, 1) or (self.rc == 1 and not self.failed)


def run_probe(copy: Path, probe: str) -> Outcome:
    """pytest PROBE in the copy, importing the copy's packages (PYTHONPATH first, before the editable install)."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", COLUMNS="400")   # untruncated summary
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *shlex.split(probe)],
                       cwd=copy, env=env, capture_output=True, text=True)
    lines = r.stdout.splitlines()
    pick = lambda tag: [ln[len(tag) + 1:] for ln in lines if ln.startswith(tag + " ")]  # noqa: E731
    return Outcome(probe, r.returncode, pick("FAILED"), pick("ERROR"), time.perf_counter() - t0)


def check_imports_from(copy: Path) -> None:
    """The copy's packages, not the repository's, are what the probes import."""
    code = "import hal, models, trainer, launch as l; print(hal.__file__, models.__file__, trainer.__file__, l.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=dict(os.environ, PYTHONPATH=str(copy)),
                         check=True, capture_output=True, text=True).stdout.split()
    if not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in out):
        sys.exit(f"the copy's tests would import {out}, not the copy's files")


def first_failure(outcomes: list[Outcome]) -> str:
    for o in outcomes:
        if o.failed:
            test, _, reason = o.failed[0].partition(" - ")
            more = sum(len(x.failed) for x in outcomes) - 1
            reason = reason.replace("|", "/")
            reason = reason if len(reason) <= 70 else reason[:67] + "..."
            return f"`{test}`" + (f" (+{more} more)" if more else "") + (f": {reason}" if reason else "")
    return "—"


def verdict(outcomes: list[Outcome]) -> str:
    if any(o.killed for o in outcomes):
        return "killed"
    return "broken (rc " + ", ".join(str(o.rc) for o in outcomes) + ")" if any(o.broken for o in outcomes) \
        else "**SURVIVED**"


def table(rows: list[tuple[Mutant, list[Outcome]]]) -> str:
    out = ["| mutant | the error | patched | killed by | result |", "|---|---|---|---|---|"]
    for m, outcomes in rows:
        passed = [o.probe for o in outcomes if not o.killed and not o.broken]
        note = ("; passed: " + ", ".join(f"`{p}`" for p in passed)) if passed and any(o.killed for o in outcomes) \
            else ""
        out.append(f"| {m.name} | {m.error} | `{m.path}` | {first_failure(outcomes)}{note} | {verdict(outcomes)} |")
    return "\n".join(out)


def run(mutants: list[Mutant], commit: str, worktree: bool, work: Path) -> list[tuple[Mutant, list[Outcome]]]:
    pristine = work / "pristine"
    pristine.mkdir()
    copy_repository(pristine, commit, worktree)
    for m in mutants:                       # every patch applies, before anything slow runs
        trial = work / "trial"
        shutil.copytree(pristine, trial)
        apply(trial, m)
        shutil.rmtree(trial)
    check_imports_from(pristine)
    for probe in dict.fromkeys(p for m in mutants for p in m.probes):
        o = run_probe(pristine, probe)
        print(f"unmutated: {probe}: rc {o.rc} in {o.seconds:.0f} s", file=sys.stderr)
        if o.rc != 0:
            sys.exit(f"the unmutated copy fails `{probe}` (rc {o.rc}): {(o.failed + o.errors)[:3]}")
    rows = []
    for m in mutants:
        copy = work / m.name
        shutil.copytree(pristine, copy)
        apply(copy, m)
        outcomes = [run_probe(copy, p) for p in m.probes]
        print(f"{m.name}: {verdict(outcomes)} in {sum(o.seconds for o in outcomes):.0f} s", file=sys.stderr)
        rows.append((m, outcomes))
        shutil.rmtree(copy)
    return rows


def report(rows, command: str, commit: str, worktree: bool, seconds: float) -> str:
    state = "the working tree's files, uncommitted changes included" if worktree else "its files"
    killed = sum(verdict(o) == "killed" for _, o in rows)
    return (f"# Mutants\n\nCommand: `{command}`  \nCommit: `{commit}` ({state})  \n"
            f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; {seconds / 60:.0f} min; "
            f"{killed} of {len(rows)} killed.\n\n"
            "Each mutant is applied alone to a copy of the repository, and its tests run there (bench/mutants.py "
            "says which; the unmutated copy passes them all first). \"killed by\" names the first failing test "
            "and its message; \"passed\" lists the tests that did not notice it.\n\n" + table(rows) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--out", help="write the table with the command and commit to this file")
    ap.add_argument("--worktree", action="store_true", help="copy the working tree's files, not HEAD's")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    args = ap.parse_args(argv)
    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        sys.exit(f"unknown mutants {unknown}; known: {sorted(names)}")
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.error} ({m.path}); tests: {', '.join(m.probes)}")
        return
    t0, commit = time.perf_counter(), git("rev-parse", "HEAD").strip()
    with tempfile.TemporaryDirectory(prefix="trichip-mutants-") as work:
        rows = run(mutants, commit, args.worktree, Path(work))
    text = report(rows, shlex.join(["python", "bench/mutants.py", *(argv if argv is not None else sys.argv[1:])]),
                  commit, args.worktree, time.perf_counter() - t0)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if any(verdict(o) != "killed" for _, o in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
