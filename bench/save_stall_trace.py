"""Why a step beside an async checkpoint save is slower than a step alone: a profiler trace of the steps
that run while the save's thread writes, summarised per thread and device stream.

    python bench/save_stall_trace.py --framework jax --model llama3.2-1b --precision bf16 --platform gpu \
        --seq-len 2048 --global-batch 16 --micro-batch 8 --out /tmp/stall
    python bench/save_stall_trace.py --framework torch --model tiny --out /tmp/stall       # tried on the CPU

Prints the step alone (median of 3), each profiled step beside the write as a multiple of it, then for every
thread and stream of the trace its busy time in the window and the events that took most of it: a device
copy queued on the compute stream, a host thread holding the GIL, or the digests show up there. The trace
(Perfetto / Chrome JSON) is left in --out for ui.perfetto.dev.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hal  # noqa: E402
from models.spec import SIZES, reference_init  # noqa: E402
from trainer import checkpoint  # noqa: E402
from trainer.data import TokenData  # noqa: E402


def summarize(trace: dict, top: int = 6) -> list[str]:
    """Per (process, thread) of a Chrome-format trace: busy ms (complete events, nested ones not counted
    twice) and the `top` event names by total time."""
    names = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            names[e["name"], e["pid"], e.get("tid")] = e["args"]["name"]
    spans, by_name = collections.defaultdict(list), collections.defaultdict(collections.Counter)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and "dur" in e:
            key = (e["pid"], e.get("tid"))
            spans[key].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
            by_name[key][e["name"]] += float(e["dur"]) / 1e3
    lines = []
    for key in sorted(spans, key=lambda k: -_busy(spans[k])):
        label = f"{names.get(('process_name', key[0], None), key[0])} / {names.get(('thread_name', *key), key[1])}"
        events = ", ".join(f"{n[:60]} {ms:.1f}" for n, ms in by_name[key].most_common(top))
        lines.append(f"| {label} | {_busy(spans[key]) / 1e3:.1f} | {events} |")
    return lines


def _busy(spans: list) -> float:
    """Microseconds covered by the union of (start, end) spans."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def traced_steps(fw: str, backend, tokens, steps: int, out: Path, during) -> tuple[list, dict]:
    """Run `steps` steps under the framework's profiler with during() started first; (step seconds, trace)."""
    times = []
    if fw == "jax":
        import jax
        jax.profiler.start_trace(str(out), create_perfetto_trace=True)
        during()
        for _ in range(steps):
            t = time.perf_counter()
            backend.train_step(tokens, 1e-3)
            times.append(time.perf_counter() - t)
        jax.profiler.stop_trace()
        return times, json.load(gzip.open(sorted(glob.glob(f"{out}/**/*.trace.json.gz", recursive=True))[-1]))
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if backend.device.type == "cuda" else [])
    with profile(activities=activities) as p:
        during()
        for _ in range(steps):
            t = time.perf_counter()
            backend.train_step(tokens, 1e-3)
            times.append(time.perf_counter() - t)
    p.export_chrome_trace(str(out / "torch-trace.json"))
    return times, json.loads((out / "torch-trace.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--framework", default="jax", choices=["jax", "torch"])
    p.add_argument("--model", default="small")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--platform", default="auto")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=3, help="profiled steps beside the write")
    p.add_argument("--out", default=None, help="where the trace stays (default: a temporary directory)")
    a = p.parse_args()
    cfg, micro = SIZES[a.model], a.micro_batch or a.global_batch
    out = Path(a.out or tempfile.mkdtemp(prefix="trichip-stall-")) / a.framework
    out.mkdir(parents=True, exist_ok=True)
    backend = hal.make_backend({"framework": a.framework, "platform": a.platform}, cfg, hal.OptimizerSpec(),
                               a.precision)
    backend.set_state(hal.HostState.fresh(reference_init(cfg, 0)))
    tokens = TokenData("builtin:python_docs", a.seq_len, 0).train_batch(0, a.global_batch)
    tokens = tokens.reshape(a.global_batch // micro, micro, a.seq_len + 1)
    alone = []
    for i in range(6):                     # 3 to warm up, 3 timed
        t = time.perf_counter()
        backend.train_step(tokens, 1e-3)
        alone.append(time.perf_counter() - t)
    alone = statistics.median(alone[3:])
    meta = {"model": cfg.to_dict(), "writer": backend.describe(), "rng": {"seed": 0},
            "data": {"path": "builtin:python_docs", "seed": 0, "next_step": 7}}
    saves = []
    with tempfile.TemporaryDirectory(prefix="trichip-stall-ckpt-") as root:
        def start_save():
            t = time.perf_counter()
            saves.append(checkpoint.PendingSave(root, 6, backend, meta, background=True))
            saves.append(time.perf_counter() - t)
        beside, trace = traced_steps(a.framework, backend, tokens, a.steps, out, start_save)
        t = time.perf_counter()
        saves[0].finish()
        commit_wait = time.perf_counter() - t
    print(f"## {a.framework}, {a.model} {a.precision}, seq {a.seq_len}, batch {a.global_batch}/{micro}, "
          f"{backend.describe().get('device_kind', a.platform)}\n")
    print(f"step alone {alone:.3f} s; save call {saves[1]:.3f} s; steps beside the write: "
          + ", ".join(f"{s:.3f} s ({s / alone:.2f}x)" for s in beside)
          + f"; then waited {commit_wait:.3f} s for the commit\n")
    print("| process / thread or stream | busy ms in the window | longest events (ms) |\n|---|---|---|")
    print("\n".join(summarize(trace)))
    print(f"\ntrace: {out}")


if __name__ == "__main__":
    main()
