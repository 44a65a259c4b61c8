"""launch.plan --measure: a few real train steps on this machine through trichip's backends (hal.make_backend),
timed after a warm-up, giving tokens/s and, where this machine's chip is in configs/plan/chips.yaml, its MFU
against that chip's dense bf16 peak; the planner then uses it in place of the chip's assumed MFU."""
from __future__ import annotations

import time

import numpy as np

from launch.planner import DEFAULT_LOSS_CHUNK
from models.errors import UserError


# device kinds as the frameworks report them -> chips.yaml keys (first match wins; v5 lite before v5)
DEVICE_KINDS = [("h200", "h200"), ("h100", "h100"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"),
                ("tpu v5", "v5p"), ("v6", "v6e"), ("trainium2", "trn2"), ("trainium", "trn1")]


def chip_of(device_kind: str) -> str | None:
    kind = (device_kind or "").lower()
    return next((chip for needle, chip in DEVICE_KINDS if needle in kind), None)


def measure(p: dict, catalog: dict, steps: int = 4, warmup: int = 2) -> dict:
    """{chip, mfu, tokens_per_s, summary}: `steps` timed train steps of plan.measure_model in plan.precision,
    the loss chunked as plan.loss_chunk says (the trainer's default where `p` has none)."""
    from hal import OptimizerSpec, make_backend
    from models.spec import SIZES, flops_per_token, reference_init
    from hal.base import HostState
    if p["measure_model"] not in SIZES:
        raise UserError(f"plan.measure_model={p['measure_model']!r}: use one of {', '.join(SIZES)}")
    if p["measure_framework"] not in ("jax", "torch"):
        raise UserError(f"plan.measure_framework={p['measure_framework']!r}: use jax or torch")
    cfg = SIZES[p["measure_model"]]
    seq = min(p["seq_len"], cfg.max_position_embeddings, 256)
    backend = make_backend({"framework": p["measure_framework"]}, cfg, OptimizerSpec(), p["precision"],
                           loss_chunk=p.get("loss_chunk", DEFAULT_LOSS_CHUNK))
    info = backend.describe()
    devices = info.get("device_count", 1)
    batch = 8 * devices
    backend.check_batch(batch)
    backend.set_state(HostState.fresh(reference_init(cfg, 0)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, batch, seq + 1), dtype=np.int32)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        backend.train_step(tokens, 1e-4)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step = float(np.median(times))
    tokens_per_s = batch * seq / step
    kind = info.get("device_kind") or info.get("device") or info.get("platform", "")
    chip = chip_of(str(kind))
    mfu = None
    if chip:
        spec = catalog["chips"][chip]
        chips = devices / spec["devices_per_chip"]
        mfu = tokens_per_s * flops_per_token(cfg, seq) / (chips * spec["bf16_tflops"] * 1e12)
    summary = (f"{p['measure_model']} on {devices} {info['platform']} device(s) ({kind}) with "
               f"{p['measure_framework']}: {tokens_per_s:,.0f} tokens/s (seq {seq}, batch {batch}, {steps} steps)"
               + (f", MFU {mfu:.1%} of {chip}'s dense bf16 peak" if mfu else
                  "; this machine's chip is not in the chip table, so no MFU is replaced"))
    return {"chip": chip, "mfu": mfu, "tokens_per_s": tokens_per_s, "summary": summary}
