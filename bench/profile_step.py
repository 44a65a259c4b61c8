"""Where one trichip train step spends its time, per op, on this machine.

    python bench/profile_step.py --framework jax --model small              # XLA ops, by kind and model part
    python bench/profile_step.py --framework torch --model small --precision bf16

JAX: a jax.profiler trace (Perfetto JSON) of two steps; each XLA thunk's time is attributed through the
compiled HLO's op_name metadata to a model part (mlp, attention, optimizer, ...). torch: torch.profiler's
table of aten ops. models.llama_jax.Linear multiplies 2-D operands because of such a profile: the
batched einsum form was 1.33x slower on `small` fp32 here.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import hal  # noqa: E402
from models.spec import SIZES, reference_init  # noqa: E402
from trainer.data import TokenData  # noqa: E402

PARTS = (("/mlp/", "mlp"), ("self_attn/q_proj", "attention q/k/v/o projections"),
         ("self_attn/k_proj", "attention q/k/v/o projections"), ("self_attn/v_proj", "attention q/k/v/o projections"),
         ("self_attn/o_proj", "attention q/k/v/o projections"), ("self_attn", "attention core (rope, scores, softmax)"),
         ("layernorm", "rmsnorm"), ("/norm/", "rmsnorm"), ("lm_head", "lm_head"), ("embed", "embedding"),
         ("log_softmax", "loss"), ("take_along_axis", "loss"), ("LlamaForCausalLM", "model, other"))


def backend_for(fw, cfg, precision):
    b = hal.make_backend({"framework": fw}, cfg, hal.OptimizerSpec(), precision)
    b.set_state(hal.HostState.fresh(reference_init(cfg, 0)))
    return b


def profile_jax(b, tokens, steps: int) -> None:
    import jax
    for _ in range(3):
        b.train_step(tokens, 1e-3)
    d = tempfile.mkdtemp(prefix="trichip-trace-")
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for _ in range(steps):
        b.train_step(tokens, 1e-3)
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(sorted(glob.glob(f"{d}/**/*.json.gz", recursive=True))[-1]))
    per_op = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X":
            per_op[e["name"]] += e["dur"] / 1e3 / steps
    hlo = b._train_step.lower(b.params, b.opt_state, b._put(tokens, b.batch_sharding),
                              np.float32(1e-3)).compile().as_text()
    meta = {}
    for line in hlo.splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"', line)
        if m:
            meta[m.group(1)] = m.group(2)
    runtime = ("ThunkExecutor", "$", "np.asarray", "SlinkyThreadPool", "PjitFunction", "CommonPjRt", "end:",
               "ParseArguments")
    kinds, parts = collections.Counter(), collections.Counter()
    for name, ms in per_op.items():
        if name.startswith(runtime):
            continue
        kinds[re.sub(r"\.\d+$", "", name)] += ms
        op = meta.get(name, "")
        part = next((p for key, p in PARTS if key in op), None)
        if part is None:
            part = "optimizer, grad norm, non-finite guard" if "transpose(jvp" not in op and "jvp(" not in op \
                else "model, other"
        parts[part] += ms
    step_ms = per_op.get("$jax_backend.py:251 train_step") or max(
        (v for k, v in per_op.items() if k.startswith("$") and "train_step" in k), default=float("nan"))
    print(f"\nstep wall time in the trace: {step_ms:.1f} ms; XLA op time (may overlap on {len(jax.devices())} "
          f"device(s)' thread pool): {sum(kinds.values()):.1f} ms")
    print("\nby model part (ms/step):")
    for k, v in parts.most_common():
        print(f"  {v:9.1f}  {k}")
    print("\nby XLA op kind (ms/step):")
    for k, v in kinds.most_common(14):
        print(f"  {v:9.1f}  {k}")
    print("\nslowest single ops (ms/step):")
    for k, v in [(k, v) for k, v in per_op.most_common() if not k.startswith(runtime)][:10]:
        print(f"  {v:9.1f}  {k:26s} {meta.get(k, '')[:110]}")


def profile_torch(b, tokens, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        b.train_step(tokens, 1e-3)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            b.train_step(tokens, 1e-3)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--framework", default="jax", choices=["jax", "torch"])
    p.add_argument("--model", default="small")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    cfg = SIZES[a.model]
    tokens = TokenData("builtin:python_docs", a.seq_len, 0).train_batch(0, a.global_batch)
    tokens = tokens.reshape(1, a.global_batch, a.seq_len + 1)
    b = backend_for(a.framework, cfg, a.precision)
    (profile_jax if a.framework == "jax" else profile_torch)(b, tokens, a.steps)


if __name__ == "__main__":
    main()
