"""Tables 2a, 2b, 3a, 3b: per framework x model x precision, tokens/s and MFU, the step split into data /
transfer / compute / logging, trichip's backend step against a hand-written loop in the same framework (run
alternately in one process), and the whole trainer.loop.train against the backend alone.

Each configuration runs in a fresh process (`bench/run.py --worker step:FW:MODEL:PRECISION`)."""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import hal
from bench.sections.common import (PEAK_LR, ROOT, WARMUP, Report, compose, f0, f1, f2, f3, make_trichip, med,
                                   now, pct)
from bench.sections.hand import HandJax, HandTorch
from models.spec import SIZES, flops_per_token, num_params
from trainer.data import TokenData
from trainer.schedule import learning_rate

TOTAL_STEPS = 10_000


def lr_at(s):
    return learning_rate(s, peak_lr=PEAK_LR, warmup_steps=WARMUP, total_steps=TOTAL_STEPS)


def transfer_fn(backend):
    """The host->device placement that train_step does first, as its own call (None if not reachable)."""
    if backend.framework == "jax" and hasattr(backend, "_put"):
        return lambda tokens: backend._put(np.asarray(tokens, np.int32), backend.batch_sharding).block_until_ready()
    if backend.framework == "torch" and hasattr(backend, "_mine"):
        torch = backend._torch

        def put(tokens):
            backend._mine(tokens)
            if backend.device.type == "cuda":
                torch.cuda.synchronize()
        return put
    return None


def loop_run(fw, size, precision, backend, steps, opts, tmp: Path) -> tuple[list, list]:
    """Run trainer.loop.train on `backend` (already compiled) for `steps` steps. Returns, per loop
    iteration, the wall time between successive train_step calls (one full iteration: step, metrics line,
    log line, checkpoint check, next batch, lr) and the train_step time inside it: a paired measurement.

    The loop's final checkpoint is skipped here (it is measured on its own in the checkpoint table)."""
    import trainer.checkpoint as ckpt_mod
    import trainer.loop as loop
    overrides = [f"hal={fw}", f"model={size}", f"trainer.steps={steps}", "trainer.eval_every=0",
                 "trainer.checkpoint_every=0", f"trainer.precision={precision}", f"trainer.seq_len={opts.seq_len}",
                 f"trainer.global_batch={opts.global_batch}"]
    if opts.micro_batch:
        overrides.append(f"trainer.micro_batch={opts.micro_batch}")
    cfg = compose(overrides)
    spans: list[tuple[float, float]] = []
    original = backend.train_step

    def timed(tokens, lr):
        t = now()
        m = original(tokens, lr)
        spans.append((t, now()))
        return m
    saved = loop.make_backend, ckpt_mod.save
    backend.train_step = timed
    loop.make_backend = lambda *a, **k: backend
    ckpt_mod.save = lambda root, step, *a, **k: Path(str(root)) / str(step)
    run_dir = Path(tempfile.mkdtemp(dir=tmp, prefix=f"loop-{fw}-{size}-"))
    try:
        loop.train(cfg, run_dir)
    finally:
        loop.make_backend, ckpt_mod.save = saved
        del backend.train_step
        shutil.rmtree(run_dir, ignore_errors=True)
    intervals = [b[0] - a[0] for a, b in zip(spans, spans[1:])]
    inside = [b - a for a, b in spans[:-1]]
    return intervals, inside


def cpu_seconds() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def warm_up(backend, hand, batches, opts) -> float:
    """Compile (JAX), allocator and thread pools (both); returns the first trichip step's time."""
    t_first = now()
    backend.train_step(batches[0], lr_at(0))
    first_step = now() - t_first
    hand.step(batches[0], lr_at(0))
    for s in range(1, opts.warmup):
        backend.train_step(batches[s % 8], lr_at(s))
        hand.step(batches[s % 8], lr_at(s))
    return first_step


def alternate(backend, hand, batches, pairs, opts, data: TokenData, metrics_path: Path, res: dict) -> float:
    """A B B A A B B A ...: each trichip step next to a hand-written one, both orders equally often. The
    trichip step is split into data, placement, train_step and logging; returns the CPU cores it kept busy."""
    gb, seq = opts.global_batch, opts.seq_len
    micro = opts.micro_batch or gb
    accum = gb // micro
    put = transfer_fn(backend)
    step = opts.warmup
    pattern = [("trichip", "hand", "hand", "trichip")[i % 4] for i in range(2 * pairs)]
    wall0, cpu0 = now(), cpu_seconds()
    with open(metrics_path, "a") as mf:
        for who in pattern:
            step += 1
            if who == "hand":
                tokens = batches[step % 8]
                t = now()
                hand.step(tokens, lr_at(step))
                res["hand"].append(now() - t)
                continue
            t = now()
            tokens = data.train_batch(step, gb).reshape(accum, micro, seq + 1)
            lr = lr_at(step)
            res["data"].append(now() - t)
            if put:
                t = now()
                put(tokens)
                res["put"].append(now() - t)
            t = now()
            m = backend.train_step(tokens, lr)
            res["step"].append(now() - t)
            t = now()
            last = {"step": step, "loss": m.loss, "lr": lr, "grad_norm": m.grad_norm,
                    "tokens_per_s": gb * seq / res["step"][-1], "step_time_s": res["step"][-1]}
            mf.write(json.dumps(last) + "\n")
            mf.flush()
            _ = (f"step {step} | loss {m.loss:.4f} | lr {lr:.3g} | grad_norm {m.grad_norm:.3f}"
                 f" | {last['tokens_per_s']:,.0f} tok/s")
            res["log"].append(now() - t)
    return (cpu_seconds() - cpu0) / (now() - wall0)


def bench_step(fw: str, size: str, precision: str, opts, data: TokenData, tmp: Path, with_loop: bool) -> dict:
    cfg = SIZES[size]
    gb, seq = opts.global_batch, opts.seq_len
    micro = opts.micro_batch or gb
    big = num_params(cfg) > 5e6
    pairs = opts.pairs_small if big else opts.pairs_tiny
    loop_steps = opts.loop_steps_small if big else opts.loop_steps_tiny

    t_build = now()
    backend = make_trichip(fw, cfg, precision)
    hand = HandJax(cfg, precision, hal.OptimizerSpec(), TOTAL_STEPS) if fw == "jax" else \
        HandTorch(cfg, precision, hal.OptimizerSpec())
    batches = [data.train_batch(s, gb).reshape(gb // micro, micro, seq + 1) for s in range(8)]
    first_step = warm_up(backend, hand, batches, opts)
    build = now() - t_build

    metrics_path = tmp / f"metrics-{fw}-{size}-{precision}.jsonl"
    res = {k: [] for k in ("data", "put", "step", "log", "hand", "loop", "loop_step")}
    cpu_share = alternate(backend, hand, batches, pairs, opts, data, metrics_path, res)
    for _ in range(opts.loop_runs if with_loop else 0):
        intervals, inside = loop_run(fw, size, precision, backend, loop_steps, opts, tmp)
        res["loop"] += intervals
        res["loop_step"] += inside
    del backend, hand
    gc.collect()
    out = {k: med(v) for k, v in res.items()}
    out.update(n={k: len(v) for k, v in res.items()}, first_step=first_step, build=build, cpu_share=cpu_share,
               best_step=min(res["step"]), best_hand=min(res["hand"]),
               tokens=gb * seq, flops_per_token=flops_per_token(cfg, seq), params=num_params(cfg))
    return out


def run_worker(job: str, opts) -> dict | None:
    """One configuration in a fresh process: no JAX config (matmul precision), thread pool or allocator
    state carries from one configuration to the next, as for a user's run."""
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--worker", job, "--seq-len", str(opts.seq_len),
           "--global-batch", str(opts.global_batch)] + (["--quick"] if opts.quick else []) + \
        (["--micro-batch", str(opts.micro_batch)] if opts.micro_batch else []) + \
        (["--pairs", str(opts.pairs)] if opts.pairs else [])
    env = dict(os.environ)
    if job.endswith(":passive"):   # OpenMP threads sleep instead of spinning while they wait for work
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            return r
    tail = (p.stderr.strip().splitlines() or ["?"])[-1]
    print(f"[{job}] failed (exit {p.returncode}): {tail}", flush=True)
    opts.failures.append(f"{job}: {tail}")
    return None


def worker(job: str, opts) -> None:
    kind, fw, size, precision = job.split(":")[:4]
    assert kind == "step", job
    data = TokenData("builtin:python_docs", opts.seq_len, 0)
    tmp = Path(tempfile.mkdtemp(prefix="trichip-bench-worker-"))
    try:
        r = bench_step(fw, size, precision, opts, data, tmp, with_loop=precision == "fp32" or opts.loop_all)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("RESULT " + json.dumps(r), flush=True)


def run_configs(opts) -> dict:
    """Every framework x model x precision (and the torch tiny fp32 row with OMP_WAIT_POLICY=PASSIVE), each
    in its own worker process."""
    TokenData("builtin:python_docs", opts.seq_len, 0)   # tokenize the corpus once, before the workers
    configs = []
    for size in opts.models:
        for fw in ("jax", "torch"):
            for precision in opts.precisions:
                configs.append((fw, size, precision))
    results = {}
    if opts.passive and "fp32" in opts.precisions:
        configs += [("torch", size, "fp32:passive") for size in opts.models if size == "tiny"]
    for fw, size, precision in configs:
        t = now()
        print(f"[step] {fw} {size} {precision} ...", flush=True)
        r = run_worker(f"step:{fw}:{size}:{precision}", opts)
        if r is None:
            continue
        results[fw, size, precision] = r
        print(f"[step] {fw} {size} {precision}: {now() - t:.0f}s, {r['tokens'] / r['step']:,.0f} tokens/s", flush=True)
    return results


def table_rows(results: dict, ceil: dict) -> tuple[list, list, list, list]:
    """The rows of tables 2a, 2b, 3a and 3b."""
    rows, rows_split, rows_over, rows_loop = [], [], [], []
    for (fw, size, label), r in results.items():
        precision = label.split(":")[0]
        if label.endswith(":passive"):
            label = precision + ", OMP_WAIT_POLICY=PASSIVE"
        tok = r["tokens"]
        backend_tps = tok / r["step"]
        loop_equiv = tok / (r["data"] + r["step"] + r["log"])
        ce = ceil.get((fw, precision))
        ce32 = ceil.get((fw, "fp32"))
        achieved = r["flops_per_token"] * backend_tps / 1e9
        best = r["flops_per_token"] * tok / r["best_step"] / 1e9
        rows.append([fw, size, label, f"{r['params'] / 1e6:.2f}M", f0(backend_tps), f0(loop_equiv),
                     f1(achieved), pct(achieved / ce if ce else None),
                     pct(achieved / ce32) if precision != "fp32" and ce32 else "",
                     pct(best / ce if ce else None), f1(r["first_step"])])
        compute = r["step"] - (r["put"] if r["put"] == r["put"] else 0.0)
        total = r["data"] + r["step"] + r["log"]
        rows_split.append([fw, size, label, f1(total * 1e3), f2(r["data"] * 1e3), f2(r["put"] * 1e3),
                           f1(compute * 1e3), f2(r["log"] * 1e3), pct((total - compute) / total),
                           f2(r["cpu_share"]), r["n"]["step"]])
        ratio = r["hand"] / r["step"]
        rows_over.append([fw, size, label, f1(r["step"] * 1e3), f1(r["hand"] * 1e3), f0(tok / r["hand"]),
                          f0(backend_tps), f3(ratio), f3(r["best_hand"] / r["best_step"]),
                          "yes" if ratio >= 0.97 else "**no**", f"{r['n']['step']}/{r['n']['hand']}"])
        if r["n"]["loop"]:
            rows_loop.append([fw, size, label, f1(r["loop"] * 1e3), f1(r["loop_step"] * 1e3),
                              f1((r["loop"] - r["loop_step"]) * 1e3), f0(tok / r["loop"]), f0(tok / r["loop_step"]),
                              f3(r["loop_step"] / r["loop"]), f0(backend_tps), r["n"]["loop"]])
    return rows, rows_split, rows_over, rows_loop


def step_section(report: Report, opts, ceil: dict, tmp: Path) -> dict:
    results = run_configs(opts)
    rows, rows_split, rows_over, rows_loop = table_rows(results, ceil)
    gb, seq = opts.global_batch, opts.seq_len
    shape = f"global batch {gb} x seq_len {seq} = {gb * seq} tokens/step" + \
        (f", micro-batch {opts.micro_batch}" if opts.micro_batch else ", no accumulation")
    report.table(
        "2a. Throughput and MFU (trichip backend, defaults)",
        ["framework", "model", "precision", "params", "tokens/s (train_step)", "tokens/s (+data+log)",
         "GFLOP/s", "MFU vs same-precision ceiling", "MFU vs fp32 ceiling", "MFU, best step", "first step s"],
        rows,
        f"{shape}. FLOPs per token from models.spec.flops_per_token (6N + attention). MFU = achieved GFLOP/s over "
        f"the framework's matmul ceiling (table 1) in the step's precision, from the median step (and from the "
        f"fastest step: what an idle machine gives). first step: compile and warm-up. Goals: JAX >= 50% of its fp32 ceiling "
        f"on small; torch >= 40%. The row with OMP_WAIT_POLICY=PASSIVE is torch fp32 in a process whose OpenMP "
        f"threads sleep instead of spin-waiting between parallel regions: with the default, any other busy "
        f"process on the machine stalls torch's threads (compare the CPU busy column of 2b).")
    report.table(
        "2b. Step time split (ms, medians)",
        ["framework", "model", "precision", "step total", "data", "host->device", "compute", "logging",
         "not compute", "CPU busy (cores)", "steps"],
        rows_split,
        "data: TokenData.train_batch + reshape + lr schedule. host->device: the backend's own placement of the "
        "token batch, timed as a separate call (JAX: make_array_from_callback + block_until_ready; torch: "
        "from_numpy(...).to(device)). compute: train_step minus that placement (forward, backward, optimizer, "
        "the loss/grad-norm fetch). logging: the metrics JSON line (json.dumps, write, flush) and the log line. "
        f"CPU busy: this process's CPU seconds per wall second over the measured steps (of {os.cpu_count()} "
        "cores; well below that means other load on the machine took the cores).")
    overhead_tables(report, rows_over, rows_loop)
    return results


def overhead_tables(report: Report, rows_over: list, rows_loop: list) -> None:
    report.table(
        "3a. Overhead against a hand-written loop in the same framework (same model, data, batch, precision)",
        ["framework", "model", "precision", "trichip step ms", "hand-written step ms", "hand tokens/s",
         "trichip tokens/s", "trichip / hand (throughput, medians)", "same, fastest steps", ">= 0.97",
         "steps (trichip/hand)"],
        rows_over,
        "Hand-written torch: models.llama_torch.LlamaForCausalLM, torch.optim.AdamW (decay on 2-D weights), "
        "clip_grad_norm_, loss.item() each step (autocast bf16 for bf16). Hand-written JAX: models.llama_jax + "
        "optax clip_by_global_norm + adamw (schedule inside) in one jax.jit with donated state, float(loss) each "
        "step. Steps alternate one by one with trichip's backend in this process (A B B A ...) on the same token "
        "batches; the ratio is the medians' ratio (and the fastest steps' ratio).")
    if rows_loop:
        report.table(
            "3b. The whole loop (trainer.loop.train) against its backend alone",
            ["framework", "model", "precision", "loop iteration ms", "its train_step ms", "loop overhead ms",
             "loop tokens/s", "train_step tokens/s", "loop / backend", "table 2a tokens/s", "iterations"],
            rows_loop,
            "trainer.loop.train from a composed config (configs/train.yaml defaults, eval off) driving the same, "
            "already compiled backend. A loop iteration is the wall time between successive train_step calls "
            "(step, metrics line, log line, checkpoint check, next batch, lr), paired with the train_step "
            "inside it, so loop / backend is measured on the same iterations. The loop's final checkpoint is "
            "not included (table 4).")
