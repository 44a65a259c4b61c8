"""What trainer.profile costs: a step's time inside a profiled window against the same step outside one,
and the time to end a window and write its files, on both frameworks.

    python bench/profile_cost.py                         # tiny, both frameworks, 8 rounds
    python bench/profile_cost.py --model small --rounds 4 --memory

Each round runs `--window` unprofiled steps, then a window of `--window` steps through hal.profile.Profiler
(what trainer.profile.steps does), alternating, on one backend; the table reports medians over rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import hal  # noqa: E402
from hal.profile import Profiler  # noqa: E402
from models.spec import SIZES, reference_init  # noqa: E402


def measure(framework: str, model: str, batch: int, seq_len: int, rounds: int, window: int, memory: bool) -> dict:
    cfg = SIZES[model]
    backend = hal.make_backend({"framework": framework}, cfg, hal.OptimizerSpec())
    backend.set_state(hal.HostState.fresh(reference_init(cfg, 0)))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq_len + 1)).astype(np.int32)
    for _ in range(3):
        backend.train_step(tokens, 1e-4)           # compile and warm up
    plain, profiled, stops = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for _ in range(window):
                t0 = time.perf_counter()
                backend.train_step(tokens, 1e-4)
                plain.append(time.perf_counter() - t0)
            profiler = Profiler(backend, Path(tmp) / f"round{r}", 1, window, memory)
            for step in range(1, window + 1):
                t0 = time.perf_counter()
                with profiler.step(step):
                    backend.train_step(tokens, 1e-4)
                profiled.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            profiler.stop(after_step=window)
            stops.append(time.perf_counter() - t0)
    return {"plain": statistics.median(plain), "profiled": statistics.median(profiled),
            "first": statistics.median(profiled[::window]), "stop": statistics.median(stops)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--model", default="tiny", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="trainer.profile.memory=true")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"`python bench/profile_cost.py {' '.join(sys.argv[1:])}` at {commit}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"model {args.model}, batch {args.batch} x {args.seq_len}, memory={args.memory}, load average (1 min) "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")
    print("| framework | step s (unprofiled) | step s (profiled) | profiled / unprofiled | first profiled step s "
          "| end of window s (files written) |")
    print("|---|---|---|---|---|---|")
    for framework in args.frameworks.split(","):
        m = measure(framework, args.model, args.batch, args.seq_len, args.rounds, args.window, args.memory)
        print(f"| {framework} | {m['plain']:.4f} | {m['profiled']:.4f} | {m['profiled'] / m['plain']:.2f}x "
              f"| {m['first']:.4f} | {m['stop']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
