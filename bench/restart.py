"""Restart to first step with cold and warm compile caches, and the goodput of a run with checkpoints.

    python bench/restart.py --model small --frameworks jax,torch --out /tmp/restart.jsonl
    python bench/restart.py --model llama3.2-1b --precision bf16 --seq-len 2048 --global-batch 8 \\
        --frameworks jax,torch --out /tmp/restart-h100.jsonl hal.platform=gpu

Every run is its own `python -m launch.train` process, with its own persistent compile cache directory
(hal.compile_cache_dir) under --workdir; the numbers come from the run.json each writes (`last_run.restart`,
`last_run.goodput`). Per framework:

1. base: a fresh run of --base-steps steps that ends with a checkpoint (its compile cache is thrown away);
2. cold: a copy of base resumed for --resume-steps steps with an empty compile cache (the cache it fills is
   kept), then warm: another copy of base resumed the same way, reading that cache;
3. goodput: a fresh run of --steps steps with a checkpoint every --checkpoint-every steps, on the warm cache.

--lean (for a large model in a short GPU lease: each checkpoint of the 1B shape is ~15 GB): per framework
only two runs, the goodput run (fresh, on an empty compile cache, which it fills) and then the same run dir
resumed for --resume-steps more steps on that cache (warm); no cold restart, no copies of checkpoints.

Extra arguments are Hydra overrides added to every run (hal.platform=gpu, hal.compile=true, ...). A JSON
object per run goes to --out; the Markdown tables to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESTART_PARTS = ("startup_s", "data_open_s", "restore_s", "loggers_s", "first_step_s", "compile_s", "other_s")
BADPUT = ("startup", "data_open", "data_read", "restore", "compile", "checkpoint", "eval", "loggers", "other")


def launch(fw: str, run_dir: Path, cache: Path, steps: int, args, extra: list[str]) -> tuple[dict, list[str]]:
    """One `python -m launch.train` process; (its run.json last_run, the command)."""
    cmd = [sys.executable, "-m", "launch.train", f"hal={fw}", f"model={args.model}", f"trainer.steps={steps}",
           f"trainer.precision={args.precision}", f"trainer.seq_len={args.seq_len}",
           f"trainer.global_batch={args.global_batch}", f"hal.compile_cache_dir={cache}", f"run_dir={run_dir}"]
    if args.micro_batch:
        cmd.append(f"trainer.micro_batch={args.micro_batch}")
    cmd += [*extra, *args.overrides]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads((run_dir / "run.json").read_text())["last_run"], cmd


def measure(fw: str, work: Path, args, out) -> dict:
    """The base, cold, warm and goodput runs of one framework; {kind: last_run}."""
    base, results = work / fw / "base", {}
    _, cmd = launch(fw, base, work / fw / "cache-base", args.base_steps, args, ["trainer.checkpoint_every=0"])
    warm_cache = work / fw / "cache"
    resumed = args.base_steps + args.resume_steps
    for kind in ("cold", "warm"):
        run = work / fw / kind
        shutil.copytree(base, run)
        last, cmd = launch(fw, run, warm_cache, resumed, args, ["trainer.checkpoint_every=0"])
        results[kind] = last
        _write(out, fw, kind, last, cmd)
    last, cmd = launch(fw, work / fw / "goodput", warm_cache, args.steps, args,
                       [f"trainer.checkpoint_every={args.checkpoint_every}"])
    results["goodput"] = last
    _write(out, fw, "goodput", last, cmd)
    return results


def measure_lean(fw: str, work: Path, args, out) -> dict:
    """The goodput run, then its run dir resumed on the compile cache it filled; {kind: last_run}."""
    run, cache, results = work / fw / "goodput", work / fw / "cache", {}
    every = [f"trainer.checkpoint_every={args.checkpoint_every}"]
    results["goodput"], cmd = launch(fw, run, cache, args.steps, args, every)
    _write(out, fw, "goodput", results["goodput"], cmd)
    results["warm"], cmd = launch(fw, run, cache, args.steps + args.resume_steps, args, every)
    _write(out, fw, "warm", results["warm"], cmd)
    return results


def _write(out, fw: str, kind: str, last: dict, cmd: list[str]) -> None:
    if out is not None:
        out.write(json.dumps({"framework": fw, "kind": kind, "restart": last["restart"], "goodput": last["goodput"],
                              "compile_cache_dir": last.get("compile_cache_dir"),
                              "command": " ".join(cmd[1:])}) + "\n")
        out.flush()


def _s(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def tables(results: dict, args) -> str:
    at = args.steps if args.lean else args.base_steps
    lines = [f"Resumed runs ({args.resume_steps} steps after a checkpoint at step {at}"
             + ("; 'empty' is the fresh goodput run's own start" if args.lean else "") + "); seconds.\n",
             "| framework | model | compile cache | restart to first step | startup | data open | restore | loggers"
             " | first step | of which compile | other |", "|---" * 11 + "|"]
    kinds = (("goodput", "empty"), ("warm", "warm")) if args.lean else (("cold", "cold"), ("warm", "warm"))
    for fw, runs in results.items():
        for kind, label in kinds:
            r = runs[kind]["restart"]
            lines.append(f"| {fw} | {args.model} | {label} | {_s(r['restart_to_first_step_s'])} | "
                         + " | ".join(_s(r[k]) for k in RESTART_PARTS) + " |")
    lines += ["", f"A fresh run of {args.steps} steps, a checkpoint every {args.checkpoint_every} "
              f"({'empty' if args.lean else 'warm'} compile cache): goodput and the lost time, % of the wall time.\n",
              "| framework | model | wall s | goodput | after warm-up | " + " | ".join(BADPUT) + " |",
              "|---" * (5 + len(BADPUT)) + "|"]
    for fw, runs in results.items():
        g = runs["goodput"]["goodput"]
        steady = g.get("goodput_after_warmup")
        lines.append(f"| {fw} | {args.model} | {g['wall_s']:.1f} | {100 * g['goodput']:.1f}% | "
                     + ("-" if steady is None else f"{100 * steady:.1f}%") + " | "
                     + " | ".join(f"{100 * g['badput'][k]:.1f}" for k in BADPUT) + " |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--steps", type=int, default=50, help="steps of the goodput run")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--base-steps", type=int, default=2, help="steps before the checkpoint the restarts resume")
    p.add_argument("--resume-steps", type=int, default=3, help="steps of each resumed run (2+: compile is known)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    p.add_argument("--out", default=None, help="JSON lines, one per measured run")
    p.add_argument("--lean", action="store_true", help="two runs per framework: goodput, then it resumed (warm)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. hal.platform=gpu")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trichip-restart-"))
    t0 = time.time()
    out = open(args.out, "a") if args.out else None
    try:
        results = {fw: (measure_lean if args.lean else measure)(fw, work, args, out)
                   for fw in args.frameworks.split(",")}
    finally:
        if out:
            out.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.time() - t0) / 60
    print(f"* code: {_commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({minutes:.1f} min)")
    print(f"* machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    print(f"* command: `python bench/restart.py {' '.join(sys.argv[1:])}`\n")
    print(tables(results, args))


if __name__ == "__main__":
    main()
