"""Table 1: the machine's matmul rate per framework and precision, the denominators of MFU."""
from __future__ import annotations

import numpy as np

from bench.sections.common import Report, f0, med, now


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
