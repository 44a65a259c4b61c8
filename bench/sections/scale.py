"""Tables 5a and 5b: step time over 1/2/4/8 JAX host devices and 1/2 torch processes (subprocesses of
launch.train), and step time against model size (from the step section's results)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.sections.common import ROOT, Report, f0, f1, f2, med


def launch_steps(overrides: list[str], env_extra: dict, nproc: int, tmp: Path, timeout: int) -> tuple[list, str]:
    run_dir = Path(tempfile.mkdtemp(dir=tmp, prefix="scale-"))
    env = dict(os.environ, **env_extra)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "launch.train"]
    else:
        cmd = [sys.executable, "-m", "launch.train"]
    cmd += overrides + [f"run_dir={run_dir}"]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        err = "" if p.returncode == 0 else f"exit {p.returncode}: " + _error_line(p.stderr)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        times = [json.loads(line)["step_time_s"] for line in lines]
    except subprocess.TimeoutExpired:
        times, err = [], f"timed out after {timeout}s"
    shutil.rmtree(run_dir, ignore_errors=True)
    return times, err


def _error_line(stderr: str) -> str:
    """The most telling line of a failed run's stderr (torchrun ends with separators and a summary)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not set(ln.strip()) <= set("=-*")]
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln or "Exception" in ln:
            return ln[:200].replace("|", "/")
    return (lines[-1] if lines else "?")[:200].replace("|", "/")


def run_plan(size: str, opts, tmp: Path) -> dict:
    """Each JAX device count and torch process count, in alternating order over the rounds."""
    gb, seq = opts.global_batch, opts.seq_len
    common = [f"trainer.steps={opts.scale_steps}", "trainer.eval_every=0", "trainer.checkpoint_every=0",
              "trainer.log_every=1000", f"trainer.seq_len={seq}", f"trainer.global_batch={gb}"]
    runs = {}
    plan = [("jax", n) for n in (1, 2, 4, 8)] + [("torch", 1), ("torch", 2)]
    for rep in range(opts.scale_rounds):
        for fw, n in (plan if rep % 2 == 0 else plan[::-1]):
            print(f"[scale] {size} {fw} x{n} ...", flush=True)
            if fw == "jax":
                ov = ["hal=jax", f"model={size}", "hal.platform=cpu", f"hal.mesh={{data:1,fsdp:{n},tensor:1}}"]
                env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
                times, err = launch_steps(ov + common, env, 1, tmp, opts.scale_timeout)
            else:
                ov = ["hal=torch", f"model={size}", "hal.platform=cpu"]
                times, err = launch_steps(ov + common, {}, n, tmp, opts.scale_timeout)
            runs.setdefault((fw, n), []).append((times, err))
    return runs


def scale_rows(size: str, runs: dict, opts) -> list:
    k, skip = opts.scale_steps, opts.scale_skip
    gb, seq = opts.global_batch, opts.seq_len
    rows, base = [], {}
    for (fw, n), results in runs.items():
        meds = [med(t[skip:]) for t, _ in results if len(t) > skip]
        errs = [e for _, e in results if e]
        st = med(meds) if meds else float("nan")
        if n == 1:
            base[fw] = st
        speed = base.get(fw, float("nan")) / st if st == st else float("nan")
        what = (f"{n} host device{'s' if n > 1 else ''}, mesh fsdp={n}" if fw == "jax" else
                ("1 process (torch threads: default)" if n == 1 else f"{n} processes (torchrun, gloo, FSDP2, "
                                                                     "OMP_NUM_THREADS=1 each)"))
        rows.append([fw, size, what, f1(st * 1e3), ", ".join(f1(m * 1e3) for m in meds), f0(gb * seq / st),
                     f2(speed), f"{len(results)} x {k} steps, first {skip} dropped", errs[0] if errs else ""])
    return rows


def scale_section(report: Report, opts, step_results: dict, tmp: Path) -> None:
    gb, seq = opts.global_batch, opts.seq_len
    rows = []
    for size in opts.scale_models:
        rows += scale_rows(size, run_plan(size, opts, tmp), opts)
    report.table(
        "5a. Scaling on this machine: step time over devices / processes (launch.train subprocesses)",
        ["framework", "model", "devices / processes", "step ms (median)", "each run's median", "tokens/s",
         "speed vs 1", "runs", "error"],
        rows,
        f"**On {os.cpu_count()} cores this shows the cost of sharding (collectives, partitioned programs, process "
        f"startup contention), not a speed-up**: 8 host devices or 2 processes share the same {os.cpu_count()} "
        f"cores that one device already uses. step_time_s from metrics.jsonl (data + train_step), global batch {gb} "
        f"x seq_len {seq}, same global batch for every row. Subprocesses cannot alternate step by step: with "
        f"other load on the machine the single torch process (2 spinning OpenMP threads) suffers most.")
    size_table(report, opts, step_results)


def size_table(report: Report, opts, step_results: dict) -> None:
    rows = []
    for fw in ("jax", "torch"):
        base = None
        for size in opts.models:
            r = step_results.get((fw, size, "fp32"))
            if not r:
                continue
            st = r["data"] + r["step"] + r["log"]
            base = base or (st, r["flops_per_token"])
            rows.append([fw, size, f"{r['params'] / 1e6:.2f}M", f1(st * 1e3), f2(st / base[0]),
                         f2(r["flops_per_token"] / base[1]), f0(r["tokens"] / st)])
    if rows:
        report.table(
            "5b. Step time against model size (fp32, from table 2)",
            ["framework", "model", "params", "step ms", "x step time", "x FLOPs/token", "tokens/s"], rows,
            "Step time growing slower than FLOPs means the smaller model is bound by fixed per-step costs "
            "(dispatch, small kernels, optimizer over many tensors) rather than by matmul throughput.")
