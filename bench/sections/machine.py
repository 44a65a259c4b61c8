"""The header of a written report: date, machine, load, versions, git state and the command."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from bench.sections.common import ROOT


def machine() -> dict:
    info = {"cpu": platform.processor() or "?", "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name", info["cpu"])
        sockets = int(fields.get("Socket(s)", "1") or 1)
        per = int(fields.get("Core(s) per socket", "0") or 0)
        info["physical_cores"] = sockets * per if per else None
        info["threads_per_core"] = fields.get("Thread(s) per core")
        flags = fields.get("Flags", "").split()
        info["isa"] = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for m in ("numpy", "torch", "jax", "flax", "optax", "orbax.checkpoint", "safetensors"):
        try:
            mod = __import__(m, fromlist=["__version__"])
            out[m.split(".")[0] if m != "orbax.checkpoint" else "orbax-checkpoint"] = getattr(mod, "__version__", "?")
        except ImportError:
            pass
    return out


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
        return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def header(info, started, elapsed, load_before, load_after, argv, done: bool) -> str:
    return "\n".join([
        "# trichip benchmark results",
        "",
        f"* date: {started.strftime('%Y-%m-%d %H:%M UTC')} ({elapsed / 60:.1f} min)",
        f"* machine: {info.get('cpu')}, {info.get('cores')} cores"
        + (f" ({info['physical_cores']} physical, {info.get('threads_per_core')} thread/core)"
           if info.get("physical_cores") else "")
        + (f", {info['memory_gib']} GiB" if info.get("memory_gib") else "")
        + (f"; ISA: {info['isa']}" if info.get("isa") else ""),
        f"* load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        "(a shared machine: ratios are from alternated runs, medians)",
        f"* versions: {', '.join(f'{k} {v}' for k, v in versions().items())}",
        f"* code: {git_state()}",
        f"* command: `python {' '.join(['bench/run.py'] + (argv if argv is not None else sys.argv[1:]))}`",
        "" if done else "* **incomplete: the run was still going when this was written**",
        "",
    ])
