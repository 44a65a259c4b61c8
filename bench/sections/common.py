"""What every section shares: the Markdown report, number formats, medians and a trichip backend."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import hal
from configs.schema import OptimConfig
from models.spec import reference_init

ROOT = Path(__file__).resolve().parents[2]
PEAK_LR, WARMUP = OptimConfig.lr, OptimConfig.warmup_steps     # the run config's defaults (configs/schema.py)


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


def make_trichip(fw: str, cfg, precision: str):
    backend = hal.make_backend({"framework": fw}, cfg, hal.OptimizerSpec(), precision)
    backend.set_state(hal.HostState.fresh(reference_init(cfg, 0)))
    return backend


def compose(overrides) -> dict:
    """The run config exactly as `python -m launch.train OVERRIDES` builds it (as tests/conftest.py does)."""
    from configs.schema import compose as compose_run
    cfg = compose_run(overrides)
    cfg.pop("run_dir", None)
    return cfg
