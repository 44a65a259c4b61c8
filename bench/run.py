"""trichip's benchmark suite: what a step costs, against what the machine and a hand-written loop can do.

    python bench/run.py --quick                                    # < 10 min on a 2-core CPU
    python bench/run.py --models tiny,small --out bench/RESULTS.md  # fuller: more rounds, more steps
    python bench/run.py --sections ceiling,step --models small      # a subset

Sections (each prints a Markdown table; --out writes them all with the date, machine and command), one
module each in bench/sections/:
  ceiling  the machine's matmul rate per framework and precision (GFLOP/s)
  step     per framework x model x precision: tokens/s, MFU, the step split into data / transfer /
           compute / logging; trichip's backend step against a hand-written loop in the same framework
           (same model, data, batch, precision; run alternately in this process); the whole
           trainer.loop.train against the backend alone
  ckpt     trainer.checkpoint save/load MB/s against safetensors.numpy of the same tensors
  scale    step time over 1/2/4/8 JAX host devices and 1/2 torch processes (subprocesses of launch.train),
           and step time against model size

Every ratio comes from measurements taken alternately in one run (A, B, A, B, ...), as medians.
Nothing here changes the library: it only drives hal.make_backend, trainer.loop.train, trainer.checkpoint
and launch.train as a user does.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections.ceiling import ceilings  # noqa: E402
from bench.sections.ckpt import ckpt_section  # noqa: E402
from bench.sections.common import Report, now  # noqa: E402
from bench.sections.machine import header, machine  # noqa: E402
from bench.sections.scale import scale_section  # noqa: E402
from bench.sections.step import step_section, worker  # noqa: E402
from models.spec import SIZES  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps (< 10 min on 2 cores)")
    p.add_argument("--models", default="tiny,small", help="comma-separated models.spec.SIZES names")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--sections", default="ceiling,step,ckpt,scale")
    p.add_argument("--out", default=None, help="write the tables (with date, machine, command) here")
    p.add_argument("--append", action="store_true", help="add this run after what --out already holds")
    p.add_argument("--seq-len", type=int, default=128, help="trainer.seq_len (default: configs/train.yaml)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--scale-models", default="tiny", help="models for the scaling table (subprocess runs)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-passive", dest="passive", action="store_false",
                   help="leave out the extra torch tiny fp32 row run with OMP_WAIT_POLICY=PASSIVE")
    p.add_argument("--pairs", type=int, default=None,
                   help="trichip/hand-written step pairs per tiny configuration (a quarter of it for small)")
    opts = p.parse_args(argv)
    opts.models = [m for m in opts.models.split(",") if m]
    opts.precisions = [x for x in opts.precisions.split(",") if x]
    opts.sections = set(opts.sections.split(","))
    for m in opts.models:
        if m not in SIZES:
            p.error(f"unknown model {m!r}; models.spec.SIZES has {sorted(SIZES)}")
    return opts


def plan(opts) -> None:
    """Rounds, steps and models per section; --quick takes fewer."""
    q = opts.quick
    opts.matmul_n = 2048
    opts.ceiling_rounds = 3 if q else 6
    opts.warmup = 2 if q else 3
    opts.pairs_tiny = opts.pairs or (12 if q else 24)
    opts.pairs_small = max(2, (opts.pairs or (8 if q else 24)) // 4)
    opts.loop_runs = 1 if q else 2
    opts.loop_steps_tiny = 12 if q else 16
    opts.loop_steps_small = 3 if q else 6
    opts.loop_all = not q
    opts.ckpt_models = [m for m in opts.models if m in ("small",)] or opts.models[-1:]
    opts.ckpt_rounds = 3 if q else 5
    opts.scale_models = [m for m in opts.scale_models.split(",") if m]
    opts.scale_rounds = 1 if q else 2
    opts.scale_steps = 8 if q else 12
    opts.scale_skip = 3
    opts.scale_timeout = 300
    opts.failures = []


def main(argv=None) -> None:
    opts = parse(argv)
    plan(opts)
    if opts.worker:
        worker(opts.worker, opts)
        return
    sections = opts.sections
    report = Report()
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    info = machine()
    t0 = now()
    ceil, step_results = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="trichip-bench-"))

    previous = Path(opts.out).read_text().rstrip() + "\n\n---\n\n" if opts.out and opts.append and \
        Path(opts.out).exists() else ""

    def write(done: bool) -> None:
        if opts.out:
            head = header(info, started, now() - t0, load_before, os.getloadavg(), argv, done)
            Path(opts.out).write_text(previous + head + "\n" + "\n".join(report.parts))
    try:
        if "ceiling" in sections or "step" in sections:
            ceil = ceilings(report, opts)
            write(False)
        if "step" in sections:
            step_results = step_section(report, opts, ceil, tmp)
            write(False)
        if "ckpt" in sections:
            ckpt_section(report, opts, step_results, tmp)
            write(False)
        if "scale" in sections:
            scale_section(report, opts, step_results, tmp)
        if opts.failures:
            report.add("### Failures\n\n" + "\n".join(f"* {f}" for f in opts.failures))
        write(True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if opts.out:
        print(f"\nwrote {opts.out}", flush=True)


if __name__ == "__main__":
    main()
