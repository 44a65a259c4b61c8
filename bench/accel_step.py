"""Time trichip's train step on one accelerator: tokens/s, MFU against a given peak, peak device memory.

    python bench/accel_step.py --framework jax --model llama3.2-1b --precision bf16 --seq-len 2048 \
        --global-batch 32 --micro-batch 4 --steps 30 --platform gpu --peak-tflops 989

Drives the backend as trainer.loop does (TokenData batch of the step, schedule's lr, backend.train_step,
which returns the loss and grad norm as Python floats, so every step ends synchronized), without the
loop's metrics file and checkpoints (the final checkpoint of a 1B run is ~15 GB and minutes long: see
bench/run.py's checkpoint table for what saves cost). Prints one JSON line: RESULT {...}.
Used by bench/accelerator.sh; runs anywhere (--platform cpu --model tiny to try it out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_memory(backend) -> float | None:
    """Peak device memory in GB, where the framework reports it."""
    try:
        if backend.framework == "torch":
            import torch
            if torch.cuda.is_available():
                return torch.cuda.max_memory_allocated() / 1e9
            return None
        import jax
        stats = jax.local_devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return peak / 1e9 if peak else None
    except Exception:   # noqa: BLE001  (a report, never a failure)
        return None


def start_save(a, backend, step: int, out: dict):
    """An async save as trainer.loop starts one; returns (PendingSave, start time)."""
    import tempfile
    from trainer import checkpoint
    root = a.save_dir or tempfile.mkdtemp(prefix="accel-ckpt-")
    out["save_dir"] = root
    t = time.perf_counter()
    pending = checkpoint.PendingSave(root, step, backend, {"model": {}, "writer": backend.describe()}, "",
                                     background=True)
    if pending.held is not None:          # JAX: the device copy is dispatched; count it as blocking
        import jax
        jax.block_until_ready(pending.held)
    out["save_block_s"] = time.perf_counter() - t
    print(f"async save of step {step}: blocked {out['save_block_s']:.3f}s", file=sys.stderr, flush=True)
    return pending, t


def commit(pending, out: dict, t_save: float) -> None:
    import shutil
    pending.finish()
    out["save_commit_s"] = time.perf_counter() - t_save
    print(f"async save committed {out['save_commit_s']:.1f}s after it started", file=sys.stderr, flush=True)
    if not out.get("save_dir_kept"):
        shutil.rmtree(out["save_dir"], ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--framework", required=True, choices=["jax", "torch"])
    p.add_argument("--model", default="llama3.2-1b")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp8"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the medians (compile, autotune)")
    p.add_argument("--platform", default="gpu")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch: torch.compile each block (hal.compile=true)")
    p.add_argument("--attention", default="auto", help="jax: hal.attention (auto | xla | cudnn)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense peak in this precision")
    p.add_argument("--bf16-peak-tflops", type=float, default=None,
                   help="the chip's dense bf16 peak: a second MFU (mfu_bf16) that compares across precisions")
    p.add_argument("--save-at", type=int, default=0,
                   help="start an async checkpoint save (trainer.checkpoint.PendingSave) after this step; report "
                        "how long it blocked, how the steps beside the write went and when it was committed")
    p.add_argument("--save-dir", default=None, help="where that checkpoint goes (default: a temp dir, removed)")
    a = p.parse_args()

    import hal
    from models.spec import SIZES, flops_per_token, num_params, reference_init
    from trainer.data import TokenData
    from trainer.schedule import learning_rate

    cfg = SIZES[a.model]
    out = {"framework": a.framework, "model": a.model, "precision": a.precision, "seq_len": a.seq_len,
           "global_batch": a.global_batch, "micro_batch": a.micro_batch, "params": num_params(cfg),
           "flops_per_token": flops_per_token(cfg, a.seq_len), "peak_tflops": a.peak_tflops,
           "bf16_peak_tflops": a.bf16_peak_tflops,
           "compile": a.compile if a.framework == "torch" else None}
    try:
        t0 = time.perf_counter()
        backend = hal.make_backend({"framework": a.framework, "platform": a.platform, "compile": a.compile,
                                    "attention": a.attention}, cfg, hal.OptimizerSpec(), a.precision, remat=a.remat)
        backend.check_batch(a.micro_batch)
        backend.set_state(hal.HostState.fresh(reference_init(cfg, 0)))
        out["setup_s"] = time.perf_counter() - t0
        out["describe"] = {k: v for k, v in backend.describe().items()
                           if k in ("platform", "devices", "versions", "attention")}
        out["attention"] = out["describe"].get("attention")
        data = TokenData("builtin:python_docs", a.seq_len, 0)
        accum = a.global_batch // a.micro_batch
        times, losses, pending, beside = [], [], None, []
        for step in range(a.steps):
            t = time.perf_counter()
            tokens = data.train_batch(step, a.global_batch).reshape(accum, a.micro_batch, a.seq_len + 1)
            lr = learning_rate(step, peak_lr=3e-4, warmup_steps=10, total_steps=max(a.steps, 11))
            m = backend.train_step(tokens, lr)
            times.append(time.perf_counter() - t)
            losses.append(m.loss)
            print(f"step {step + 1}/{a.steps}: {times[-1]:.3f}s loss {m.loss:.4f}", file=sys.stderr, flush=True)
            if pending is not None:
                beside.append(times[-1])
                if pending.done():
                    commit(pending, out, t_save)
                    pending = None
            if a.save_at and step + 1 == a.save_at:
                pending, t_save = start_save(a, backend, step + 1, out)
        if pending is not None:
            out["save_steps_beside"] = len(beside)
            commit(pending, out, t_save)
        if beside:
            out["save_steps_beside"] = len(beside)
            out["save_step_beside_s"] = statistics.median(beside)
        timed = [x for i, x in enumerate(times) if i >= a.warmup and not (a.save_at and a.save_at <= i < a.save_at
                                                                        + len(beside))] or times
        step_s = statistics.median(timed)
        tokens_per_step = a.global_batch * a.seq_len
        out.update(first_step_s=times[0], step_s=step_s, step_min_s=min(timed), steps_timed=len(timed),
                   tokens_per_s=tokens_per_step / step_s, loss_first=losses[0], loss_last=losses[-1],
                   peak_mem_gb=peak_memory(backend))
        achieved = out["flops_per_token"] * out["tokens_per_s"]
        out["tflops"] = achieved / 1e12
        out["mfu"] = achieved / (a.peak_tflops * 1e12) if a.peak_tflops else None
        out["mfu_bf16"] = achieved / (a.bf16_peak_tflops * 1e12) if a.bf16_peak_tflops else None
        out["ok"] = True
    except Exception as e:   # noqa: BLE001  (OOM and friends are results: the script retries smaller)
        text = f"{type(e).__name__}: {e}"
        out.update(ok=False, error=text.splitlines()[0][:300],
                   oom=any(s in text for s in ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory", "Out of memory")))
        traceback.print_exc()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
