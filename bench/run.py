"""trichip's benchmark suite: what a step costs, against what the machine and a hand-written loop can do.

    python bench/run.py --quick                                    # < 10 min on a 2-core CPU
    python bench/run.py --models tiny,small --out bench/RESULTS.md  # fuller: more rounds, more steps
    python bench/run.py --sections ceiling,step --models small      # a subset

Sections (each prints a Markdown table; --out writes them all with the date, machine and command):
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
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import hal  # noqa: E402
from models.spec import SIZES, flops_per_token, nest, num_params, reference_init  # noqa: E402
from trainer.data import TokenData  # noqa: E402
from trainer.schedule import learning_rate  # noqa: E402

PEAK_LR, WARMUP = 3e-3, 30   # configs/optim/adamw.yaml


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def jax_block(tree):
    import jax
    return jax.block_until_ready(tree)


def now():
    return time.perf_counter()


class Report:
    """Markdown sections, printed as they complete and written (with a header) at the end."""

    def __init__(self):
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text.rstrip() + "\n")
        print("\n" + text.rstrip() + "\n", flush=True)

    def table(self, title: str, header: list[str], rows: list[list], notes: str = "") -> None:
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            lines.append("| " + " | ".join(str(c) for c in r) + " |")
        if notes:
            lines += ["", notes.strip()]
        self.add("\n".join(lines))


def f0(x):
    return "-" if x is None or x != x else f"{x:,.0f}"


def f1(x):
    return "-" if x is None or x != x else f"{x:,.1f}"


def f2(x):
    return "-" if x is None or x != x else f"{x:.2f}"


def f3(x):
    return "-" if x is None or x != x else f"{x:.3f}"


def pct(x):
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# 1. ceilings
# ---------------------------------------------------------------------------------------------------
def ceilings(report: Report, opts) -> dict:
    """GFLOP/s of one big square matmul per framework and precision, measured alternately."""
    import jax
    import jax.numpy as jnp
    import torch

    n = opts.matmul_n
    flops = 2.0 * n ** 3
    rng = np.random.default_rng(0)
    a_np, b_np = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    mm = jax.jit(lambda x, y: x @ y)
    ja, jb = jnp.asarray(a_np), jnp.asarray(b_np)
    ja16, jb16 = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    ta16, tb16 = ta.bfloat16(), tb.bfloat16()
    cases = {
        ("jax", "fp32"): lambda: mm(ja, jb).block_until_ready(),
        ("jax", "bf16"): lambda: mm(ja16, jb16).block_until_ready(),
        ("torch", "fp32"): lambda: torch.mm(ta, tb),
        ("torch", "bf16"): lambda: torch.mm(ta16, tb16),
    }
    times = {k: [] for k in cases}
    for f in cases.values():   # compile / warm up
        f(), f()
    for r in range(opts.ceiling_rounds):
        for k in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            for _ in range(3):
                t = now()
                cases[k]()
                times[k].append(now() - t)
    result = {k: flops / med(v) / 1e9 for k, v in times.items()}
    report.table(
        f"1. Ceiling: one {n}x{n}x{n} matmul (GFLOP/s)",
        ["framework", "fp32", "bf16", "how"],
        [["jax", f0(result["jax", "fp32"]), f0(result["jax", "bf16"]), "jax.jit(x @ y), block_until_ready"],
         ["torch", f0(result["torch", "fp32"]), f0(result["torch", "bf16"]),
          f"torch.mm, default settings, {torch.get_num_threads()} threads"]],
        f"Median of {3 * opts.ceiling_rounds} products each, alternating frameworks. These are the denominators "
        "of MFU below (a step's matmuls are smaller than this one, so 100% is out of reach on any machine).")
    return result


# ---------------------------------------------------------------------------------------------------
# 2./3. step: trichip backend vs hand-written, breakdown, whole loop
# ---------------------------------------------------------------------------------------------------
class HandTorch:
    """A plain PyTorch loop: the model, torch.optim.AdamW with the same two param groups, clip, step."""

    def __init__(self, cfg, precision: str, optim: hal.OptimizerSpec):
        import torch
        from models.llama_torch import LlamaForCausalLM
        self.torch, self.precision, self.optim = torch, precision, optim
        self.net = LlamaForCausalLM(cfg)
        self.net.load_state_dict({k: torch.from_numpy(v) for k, v in reference_init(cfg, 0).items()})
        self.net.train()
        named = dict(self.net.named_parameters())
        self.params = list(named.values())
        self.opt = torch.optim.AdamW(
            [{"params": [p for p in self.params if p.ndim == 2], "weight_decay": optim.weight_decay},
             {"params": [p for p in self.params if p.ndim != 2], "weight_decay": 0.0}],
            lr=0.0, betas=(optim.b1, optim.b2), eps=optim.eps)

    def step(self, tokens: np.ndarray, lr: float) -> float:
        torch = self.torch
        import torch.nn.functional as F
        batch = torch.from_numpy(tokens).long()
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in batch:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
            with ctx:
                logits = self.net(micro[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten())
            (loss / batch.shape[0]).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, self.optim.max_grad_norm)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        return total / batch.shape[0]


class HandJax:
    """A plain JAX loop: the Flax model, optax clip + adamw (schedule inside), one jax.jit with donation."""

    def __init__(self, cfg, precision: str, optim: hal.OptimizerSpec, total_steps: int):
        import jax
        import jax.numpy as jnp
        import optax
        from models.llama_jax import LlamaForCausalLM, cross_entropy
        self.jax = jax
        net = LlamaForCausalLM(cfg, dtype=jnp.bfloat16 if precision == "bf16" else jnp.float32)
        init = reference_init(cfg, 0)
        self.params = nest({k: jnp.asarray(v) for k, v in init.items()})
        mask = nest({k: v.ndim == 2 for k, v in init.items()})
        schedule = optax.warmup_cosine_decay_schedule(0.0, PEAK_LR, WARMUP, max(total_steps, WARMUP + 1),
                                                      PEAK_LR * 0.1)
        tx = optax.chain(optax.clip_by_global_norm(optim.max_grad_norm),
                         optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                     weight_decay=optim.weight_decay, mask=mask))
        self.opt_state = tx.init(self.params)

        def loss_fn(params, tok):
            return cross_entropy(net.apply({"params": params}, tok[:, :-1]), tok[:, 1:])

        def step(params, opt_state, tokens):
            if tokens.shape[0] == 1:
                loss, grads = jax.value_and_grad(loss_fn)(params, tokens[0])
            else:
                def micro(acc, tok):
                    return jax.tree.map(jnp.add, acc, jax.value_and_grad(loss_fn)(params, tok)), None
                zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
                (loss, grads), _ = jax.lax.scan(micro, zero, tokens)
                loss, grads = jax.tree.map(lambda x: x / tokens.shape[0], (loss, grads))
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = jax.jit(step, donate_argnums=(0, 1))

    def step(self, tokens: np.ndarray, lr: float) -> float:
        self.params, self.opt_state, loss = self._step(self.params, self.opt_state, self.jax.numpy.asarray(tokens))
        return float(loss)


def make_trichip(fw: str, cfg, precision: str):
    backend = hal.make_backend({"framework": fw}, cfg, hal.OptimizerSpec(), precision)
    backend.set_state(hal.HostState.fresh(reference_init(cfg, 0)))
    return backend


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


def compose(overrides) -> dict:
    """The run config exactly as `python -m launch.train OVERRIDES` builds it (as tests/conftest.py does)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from omegaconf import OmegaConf
    with initialize_config_module("configs", version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides))
    cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg.pop("run_dir", None)
    return cfg


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


def bench_step(fw: str, size: str, precision: str, opts, data: TokenData, tmp: Path, with_loop: bool) -> dict:
    cfg = SIZES[size]
    gb, seq = opts.global_batch, opts.seq_len
    micro = opts.micro_batch or gb
    accum = gb // micro
    big = num_params(cfg) > 5e6
    pairs = opts.pairs_small if big else opts.pairs_tiny
    loop_steps = opts.loop_steps_small if big else opts.loop_steps_tiny
    total_steps = 10_000

    def lr_at(s):
        return learning_rate(s, peak_lr=PEAK_LR, warmup_steps=WARMUP, total_steps=total_steps)

    t_build = now()
    backend = make_trichip(fw, cfg, precision)
    hand = HandJax(cfg, precision, hal.OptimizerSpec(), total_steps) if fw == "jax" else \
        HandTorch(cfg, precision, hal.OptimizerSpec())
    put = transfer_fn(backend)
    batches = [data.train_batch(s, gb).reshape(accum, micro, seq + 1) for s in range(8)]
    # warm up: compile (JAX), allocator and thread pools (both)
    t_first = now()
    backend.train_step(batches[0], lr_at(0))
    first_step = now() - t_first
    hand.step(batches[0], lr_at(0))
    for s in range(1, opts.warmup):
        backend.train_step(batches[s % 8], lr_at(s))
        hand.step(batches[s % 8], lr_at(s))
    build = now() - t_build

    metrics_path = tmp / f"metrics-{fw}-{size}-{precision}.jsonl"
    res = {k: [] for k in ("data", "put", "step", "log", "hand", "loop", "loop_step")}
    step = opts.warmup
    # A B B A A B B A ...: each trichip step next to a hand-written one, both orders equally often
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
    cpu_share = (cpu_seconds() - cpu0) / (now() - wall0)
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--seq-len", str(opts.seq_len),
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
    data = TokenData("builtin:python_docs", opts.seq_len, 0, 257)
    tmp = Path(tempfile.mkdtemp(prefix="trichip-bench-worker-"))
    try:
        r = bench_step(fw, size, precision, opts, data, tmp, with_loop=precision == "fp32" or opts.loop_all)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("RESULT " + json.dumps(r), flush=True)


def step_section(report: Report, opts, ceil: dict, tmp: Path) -> dict:
    data = TokenData("builtin:python_docs", opts.seq_len, 0, 257)
    configs = []
    for size in opts.models:
        for fw in ("jax", "torch"):
            for precision in opts.precisions:
                configs.append((fw, size, precision))
    del data
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
    return results


# ---------------------------------------------------------------------------------------------------
# 4. checkpoints
# ---------------------------------------------------------------------------------------------------
def settle(path=None) -> None:
    """Write back what is dirty: a file (its fsync), or with no path everything (the last round's truncations
    too). Untimed between measurements, so that the bench's own writeback does not run inside the next one."""
    if path is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(path: Path) -> None:
    """Untimed, at the end of a round: free what the round wrote (truncate every file: its blocks and page
    cache go) but leave the files to be unlinked after the section. On this machine's ext4 (no journal) a
    file created within 30 s of others being unlinked makes the kernel check every recently freed inode of
    its block group first (recently_deleted in find_inode_bit): with the round before unlinked, the 681
    creates of a small-model checkpoint took 0.2 s of CPU, against 0.005-0.06 s without (a loop of tensorstore
    writes: 0.29 s vs 0.22 s, raw + fsync 0.21 s). Back-to-back rounds would charge every writer that creates
    files for the previous round's cleanup; 4d's last column shows a write right after one checkpoint's unlink.
    Keeping the files whole instead fills the page cache, and reclaim then slowed every writer (raw + fsync
    0.21 -> 0.57 s)."""
    for root, _, files in os.walk(path):
        for f in files:
            os.truncate(os.path.join(root, f), 0)


def raw_sync(path: str, tensors: dict) -> None:
    """safetensors.numpy save_file, then the fsync that makes it durable, as trichip's save is (tensorstore
    syncs what it writes)."""
    from safetensors.numpy import save_file
    save_file(tensors, path)
    settle(path)


def orbax_write(path: str, tensors: dict, compression: bool) -> None:
    """orbax's PyTreeCheckpointer as it comes (OCDBT; zstd unless compression=False), for table 4d."""
    import orbax.checkpoint as ocp

    from hal import store
    with ocp.PyTreeCheckpointer(use_compression=compression) as ckptr:
        ckptr.save(os.path.abspath(path), store._nested(tensors))


def ckpt_section(report: Report, opts, step_results: dict, tmp: Path) -> dict:
    from safetensors.numpy import load_file, save_file

    from hal import store
    from trainer import checkpoint
    rows, rows_split, rows_async, rows_layout, out, kept = [], [], [], [], {}, []
    data = TokenData("builtin:python_docs", opts.seq_len, 0, 257)
    for size in opts.ckpt_models:
        cfg = SIZES[size]
        for fw in ("jax", "torch"):
            print(f"[ckpt] {fw} {size} ...", flush=True)
            backend = make_trichip(fw, cfg, "fp32")
            gb = opts.global_batch
            micro = opts.micro_batch or gb
            backend.train_step(data.train_batch(0, gb).reshape(gb // micro, micro, opts.seq_len + 1), 1e-3)
            host = backend.get_state().tensors()   # non-zero moments, count 1
            nbytes = sum(v.nbytes for v in host.values())
            meta = {"model": cfg.to_dict(), "writer": backend.describe(),
                    "data": {"path": "builtin:python_docs", "seed": 0, "next_step": 1}, "rng": {"seed": 0}}
            times = {k: [] for k in ("save", "raw_save", "raw_save_sync", "load", "raw_load", "get_state", "digest",
                                     "write", "write_ocdbt", "write_default", "raw_sync_again", "read", "async_block",
                                     "async_copy", "step_alone", "step_beside", "async_total", "write_after_unlink")}
            batch = data.train_batch(0, gb).reshape(gb // micro, micro, opts.seq_len + 1)
            for r in range(opts.ckpt_rounds):
                settle()
                d = Path(tempfile.mkdtemp(dir=tmp, prefix=f"ck-{fw}-{size}-"))
                order = ("trichip", "raw") if r % 2 == 0 else ("raw", "trichip")
                for who in order:
                    if who == "trichip":
                        t = now()
                        path = checkpoint.save(d / "checkpoints", 1, backend, meta)
                        times["save"].append(now() - t)
                        t = now()
                        checkpoint.load(path, backend)
                        times["load"].append(now() - t)
                    else:
                        t = now()
                        save_file(host, str(d / "raw.safetensors"))
                        times["raw_save"].append(now() - t)
                        settle(d / "raw.safetensors")
                        t = now()
                        raw_sync(str(d / "raw-sync.safetensors"), host)
                        times["raw_save_sync"].append(now() - t)
                        t = now()
                        load_file(str(d / "raw.safetensors"))
                        times["raw_load"].append(now() - t)
                # where a save's time goes: each part alone
                t = now()
                state = backend.get_state().tensors()
                times["get_state"].append(now() - t)
                t = now()
                store.digests(state)
                times["digest"].append(now() - t)
                writers = [("write", lambda q: store.write_tensors(q, state)),
                           ("write_ocdbt", lambda q: orbax_write(q, state, compression=False)),
                           ("write_default", lambda q: orbax_write(q, state, compression=True)),
                           ("raw_sync_again", lambda q: raw_sync(q, state))]
                for name, write in (writers if r % 2 == 0 else writers[::-1]):    # alternated
                    t = now()
                    write(str(d / name))
                    times[name].append(now() - t)
                t = now()
                store.read_tensors(str(d / "write"), list(state))
                times["read"].append(now() - t)
                # async save (trainer.async_save): what blocks the loop, and the step that runs beside the write
                t = now()
                backend.train_step(batch, 1e-3)
                times["step_alone"].append(now() - t)
                t0 = now()
                pending = checkpoint.PendingSave(d / "async", 1, backend, meta, background=True)
                times["async_block"].append(now() - t0)
                if fw == "jax":     # the device copy may still run after the call: wait for it, count it
                    jax_block(pending.held)
                    times["async_copy"].append(now() - t0 - times["async_block"][-1])
                t = now()
                backend.train_step(batch, 1e-3)
                times["step_beside"].append(now() - t)
                pending.finish()
                times["async_total"].append(now() - t0)
                # a write right after a checkpoint's files were unlinked (what prune does after a save)
                shutil.rmtree(d / "write")
                t = now()
                store.write_tensors(str(d / "write_after_unlink"), state)
                times["write_after_unlink"].append(now() - t)
                discard(d)
                kept.append(d)
            del backend
            gc.collect()
            m = {k: med(v) for k, v in times.items()}
            mb = nbytes / 1e6
            step = step_results.get((fw, size, "fp32"))
            step_s = (step["data"] + step["step"] + step["log"]) if step else None
            save_ratio, sync_ratio = m["raw_save"] / m["save"], m["raw_save_sync"] / m["save"]
            rows.append([fw, size, f1(mb), f0(mb / m["save"]), f0(mb / m["raw_save"]), f2(save_ratio),
                         f0(mb / m["raw_save_sync"]), f2(sync_ratio), "yes" if sync_ratio >= 0.7 else "**no**",
                         f0(mb / m["load"]), f0(mb / m["raw_load"]), f2(m["raw_load"] / m["load"])])
            copy_s = m["async_copy"] if times["async_copy"] else 0.0
            block = m["async_block"] + copy_s
            rows_async.append([fw, size, f3(m["save"]), f3(m["async_block"]),
                               f3(copy_s) if copy_s else "(in the call)", f3(m["step_alone"]),
                               pct(block / m["step_alone"]), "yes" if block < 0.05 * m["step_alone"] else "**no**",
                               f3(m["step_beside"]), f2(m["step_beside"] / m["step_alone"]), f3(m["async_total"])])
            rows_layout.append([fw, size, f3(m["raw_sync_again"]), f3(m["write"]), f2(m["raw_sync_again"] / m["write"]),
                                f3(m["write_ocdbt"]), f2(m["raw_sync_again"] / m["write_ocdbt"]),
                                f3(m["write_default"]), f2(m["raw_sync_again"] / m["write_default"]),
                                f3(m["write_after_unlink"]), f2(m["raw_sync_again"] / m["write_after_unlink"])])
            rows_split.append([fw, size, f3(m["save"]), f3(m["get_state"]), f3(m["digest"]), f3(m["write"]),
                               f3(m["load"]), f3(m["read"]), f3(m["raw_save"]), f3(m["raw_load"])])
            out[fw, size] = m
    report.table(
        "4a. Checkpoint save/restore throughput: trichip.checkpoint against raw safetensors",
        ["framework", "model", "state MB", "save MB/s", "raw save MB/s", "save / raw", "raw save + fsync MB/s",
         "save / (raw + fsync)", ">= 0.7", "restore MB/s", "raw read MB/s", "restore / raw"],
        rows,
        "State = params + AdamW mu + nu (float32) + count. trichip save = trainer.checkpoint.save, blocking "
        "(orbax, one uncompressed zarr array per tensor, per-tensor digests, manifest, fsync, rename); restore = "
        "trainer.checkpoint.load (read, verify digests, place on the backend). Raw = safetensors.numpy save_file/"
        "load_file of the same host tensors (no device->host copy, no checksums); 'raw + fsync' adds the fsync "
        "that makes a file survive a power cut, which trichip's save does (tensorstore syncs its writes). Same "
        "local disk, page cache, alternating; each round starts from a synced disk, and what it wrote is truncated "
        "and unlinked only after the section (bench.run.discard). The goal (0.7x) is read against the durable raw "
        "write.")
    report.table(
        "4c. Async save (trainer.async_save=true, the default): what blocks the loop",
        ["framework", "model", "blocking save s", "async: call s", "async: device copy s", "step alone s",
         "blocks (share of a step)", "< 5%", "step beside the write s", "beside / alone", "async save to commit s"],
        rows_async,
        "call: trainer.checkpoint.PendingSave(background=True), i.e. the state copy (torch: clone of its tensors; "
        "JAX: a jitted copy, dispatched; 'device copy' is how long it then still ran, counted as blocking). The "
        "write, digests and commit then run in a thread while the next step runs: on these 2 "
        "cores they compete with it for CPU (beside / alone); on an accelerator the step runs on the device. "
        "Commit: PendingSave.finish() after that step (manifest, rename), from the call.")
    report.table(
        "4b. Where a save and a restore spend their time (s, each part run alone)",
        ["framework", "model", "save", "get_state (device->host)", "digests (hal.store.digests)",
         "orbax write (hal.store.write_tensors)", "restore", "orbax read (hal.store.read_tensors)",
         "raw save", "raw read"],
        rows_split,
        "A save calls no get_state: backend.snapshot hands the write JAX's arrays (each process its own shards) or "
        "NumPy views of torch's tensors; the column is what a host copy of the state costs. The digests run beside "
        "the write, so the parts overlap the save's total.")
    report.table(
        "4d. Writing the same host tensors three ways (s, alternated in each round; no digests, no manifest)",
        ["framework", "model", "raw + fsync", "hal.store.write_tensors", "raw / it", "orbax OCDBT, no zstd",
         "raw / it", "orbax defaults (OCDBT, zstd)", "raw / it", "write_tensors right after an unlink", "raw / it"],
        rows_layout,
        "hal.store.write_tensors: what a single-process save writes (a zarr array per tensor, no compression, no "
        "copy of host arrays; OCDBT when several processes write). 'orbax OCDBT, no zstd': session 2's writer. "
        "'orbax defaults': ocp.PyTreeCheckpointer() as it comes. Each writes state = backend.get_state().tensors(). "
        "Rounds free their files by truncation and unlink them after the section (bench.run.discard says why); the "
        "last column is a write_tensors just after the round's first one was unlinked, as when prune removes "
        "an old checkpoint shortly before a save (not alternated: it runs last in each round).")
    for d in kept:
        shutil.rmtree(d, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------
# 5. scaling
# ---------------------------------------------------------------------------------------------------
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


def scale_section(report: Report, opts, step_results: dict, tmp: Path) -> None:
    k, skip = opts.scale_steps, opts.scale_skip
    gb, seq = opts.global_batch, opts.seq_len
    common = [f"trainer.steps={k}", "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.log_every=1000",
              f"trainer.seq_len={seq}", f"trainer.global_batch={gb}"]
    rows = []
    for size in opts.scale_models:
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
        base = {}
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


# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
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
    sections = set(opts.sections.split(","))
    for m in opts.models:
        if m not in SIZES:
            p.error(f"unknown model {m!r}; models.spec.SIZES has {sorted(SIZES)}")
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
    if opts.worker:
        worker(opts.worker, opts)
        return

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
            Path(opts.out).write_text(previous + header(done) + "\n" + "\n".join(report.parts))

    def header(done: bool) -> str:
        return _header(info, started, now() - t0, load_before, os.getloadavg(), argv, done)
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


def _header(info, started, elapsed, load_before, load_after, argv, done: bool) -> str:
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


if __name__ == "__main__":
    main()
