"""Step time and per-process memory of torch mesh shapes (data x fsdp x tensor) over gloo processes on the CPU,
against one process: a correctness-and-overhead run (every process shares the same few cores, so more
processes are no speed-up here), not a scaling measurement.

    python bench/tensor_parallel.py                     # tiny, 4 processes, 30 steps; prints a markdown table
    python bench/tensor_parallel.py --nproc 8 --model small --steps 20

Per row: the median step time over the steps after the first five (tokens per step / the metrics' tokens_per_s),
the largest relative loss gap from the one-process run, and what process 0 holds, measured by the backend:
parameter and optimizer bytes (its local shards) and activation bytes (what autograd saved for the backward
pass of one micro-batch, from the run's log).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MESHES = {4: [{"data": 1, "fsdp": 4, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 1},
              {"data": 1, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 1, "tensor": 2}],
          8: [{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 1, "fsdp": 4, "tensor": 2},
              {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 2, "tensor": 4}]}


def run(run_dir: Path, nproc: int, mesh: dict | None, args) -> tuple[Path, str]:
    cmd = [sys.executable, "-m", "launch.train"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "launch.train"]
    overrides = ["hal=torch", f"model={args.model}", f"trainer.steps={args.steps}", "trainer.log_every=1",
                 f"trainer.global_batch={args.global_batch}", f"trainer.seq_len={args.seq_len}",
                 "trainer.eval_every=0", "trainer.checkpoint_every=0", "optim.lr=1e-3", f"run_dir={run_dir}"]
    if args.vocab:
        overrides.append(f"data.vocab={args.vocab}")
    if mesh:
        overrides.append("hal.mesh={" + ",".join(f"{k}:{v}" for k, v in mesh.items()) + "}")
    r = subprocess.run(cmd + overrides, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd + overrides)} failed:\n{r.stderr[-3000:]}")
    return run_dir, r.stdout + r.stderr


def row(run_dir: Path, log: str, tokens: int, reference: np.ndarray | None) -> dict:
    ms = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = np.array([m["loss"] for m in ms])
    step_s = float(np.median([tokens / m["tokens_per_s"] for m in ms[5:]]))
    step = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    writer = json.loads((run_dir / "checkpoints" / str(step) / "manifest.json").read_text())["writer"]
    acts = re.search(r"process 0 holds .*?activations ([0-9.]+) MiB", log)
    gap = None if reference is None else float((np.abs(losses - reference) / np.abs(reference)).max())
    return {"mesh": writer["mesh"], "processes": writer["process_count"], "step_ms": 1000 * step_s,
            "params_mib": writer["bytes_per_device"]["params"] / 2 ** 20,
            "optimizer_mib": writer["bytes_per_device"]["optimizer"] / 2 ** 20,
            "activations_mib": float(acts.group(1)) if acts else float("nan"), "gap": gap}


def table(rows: list[dict]) -> str:
    out = ["| processes | mesh d/f/t | step ms (median) | x one process | params MiB / process | "
           "optimizer MiB / process | activations MiB / process | max rel loss gap vs one process |",
           "|---|---|---|---|---|---|---|---|"]
    base = rows[0]["step_ms"]
    for r in rows:
        m = r["mesh"]
        gap = "reference" if r["gap"] is None else f"{r['gap']:.1e}"
        out.append(f"| {r['processes']} | {m['data']}/{m['fsdp']}/{m['tensor']} | {r['step_ms']:.1f} | "
                   f"{r['step_ms'] / base:.2f} | {r['params_mib']:.3f} | {r['optimizer_mib']:.3f} | "
                   f"{r['activations_mib']:.2f} | {gap} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=4, choices=sorted(MESHES))
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab", default="pad128", help="data.vocab (pad128: a vocabulary the tensor ranks split)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    args = p.parse_args()
    tokens = args.global_batch * args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        single, log = run(Path(tmp) / "single", 1, None, args)
        rows = [row(single, log, tokens, None)]
        reference = np.array([json.loads(line)["loss"] for line in (single / "metrics.jsonl").read_text().splitlines()])
        for i, mesh in enumerate(MESHES[args.nproc]):
            rows.append(row(*run(Path(tmp) / f"mesh{i}", args.nproc, mesh, args), tokens, reference))
    print(table(rows))


if __name__ == "__main__":
    main()
