"""python -m launch.plan model=<name> 'plan.targets=[1xh100,p5.48xlarge,tpu-v5p-64,trn2.48xlarge]' plan.tokens=1e12

For each target: whether the model fits (per-device memory with and without activation checkpointing), the
mesh trichip would build (hal/mesh.py's platform rules), tokens/s from a roofline, and the cost of the budget
from configs/plan/prices.yaml. Prints a ranked table and the launch command of the winner; writes plan.json,
plan.png (cost vs time) and plan.log in the run directory. `plan.measure=true` (or --measure) first runs a
few real steps on this machine and uses the measured MFU for the local chip.

`plan.hf_dir=DIR` reads the model from a Hugging Face config.json instead of `model=`. Anything the user
must change ends in one line on stderr and exit code 2.
"""
from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from configs.schema import ModelConfig, Precision, TrainerConfig, explain, to_plain
from models.errors import UserError

EXIT_USER_ERROR = 2
log = logging.getLogger("trichip.plan")
DEFAULT_TARGETS = ["1xh100", "p5.48xlarge", "p5e.48xlarge", "a3-ultragpu-8g", "tpu-v5e-64", "tpu-v5p-128",
                   "tpu-v6e-64", "trn1.32xlarge", "trn2.48xlarge"]


@dataclass
class PlanSection:
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    tokens: Optional[float] = None          # the token budget to train
    tokens_per_s: Optional[float] = None    # a throughput target
    hours: Optional[float] = None           # a deadline for plan.tokens
    hf_dir: Optional[str] = None            # a Hugging Face directory (config.json) instead of model=
    seq_len: int = 2048
    global_batch: int = 256                 # sequences per update
    micro_batch: Optional[int] = None       # sequences per forward/backward over the mesh; null = global_batch
    precision: Precision = Precision.bf16   # fp8: GPUs with float8 tensor cores only (H100, H200)
    remat: Any = "auto"                     # auto (only where needed) | true | false
    loss_chunk: int = TrainerConfig.loss_chunk   # trainer.loss_chunk: tokens per chunk of the loss, 0 = whole logits
    overlap: float = 0.75                   # share of the communication hidden under compute
    mfu: Any = None                         # {chip: mfu} overriding configs/plan/chips.yaml
    prices: Optional[str] = None            # your price file (layout of configs/plan/prices.yaml)
    chips: Optional[str] = None             # your chip file (layout of configs/plan/chips.yaml)
    measure: bool = False                   # run a few real steps here and use the measured MFU
    measure_framework: str = "jax"          # which backend measures (jax | torch)
    measure_model: str = "small"            # the stand-in measured on this machine (tiny | small | the model)
    chart: bool = True                      # plan.png


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    plan: PlanSection = field(default_factory=PlanSection)
    run_dir: str = "outputs/plan/${now:%Y-%m-%d}/${now:%H-%M-%S}"


ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def precheck(argv: list[str]) -> None:
    """Compose once before Hydra so a bad override is one line, not Hydra's traceback."""
    if any(a.startswith("-") and a != "--measure" for a in argv):
        return
    from hydra import compose, initialize_config_module
    try:
        with initialize_config_module("configs", version_base="1.3"):
            cfg = compose("plan", overrides=[a for a in argv if a != "--measure"])
        to_plain(cfg)
    except Exception as e:  # Hydra's composition and override errors have no common base class
        key = getattr(e, "full_key", None)
        _fail(f"{key} has no value: set it ({key}=...)" if key and "Missing" in type(e).__name__ else explain(e))


def run(plain: dict, run_dir: Path) -> list[dict]:
    """The plan for a resolved config; writes plan.json (and plan.png) into run_dir and returns the rows."""
    from launch import planner
    p = plain["plan"]
    cfg, model_name = model_of(plain)
    check_budget(p)
    catalog = planner.load_catalog(p["chips"], p["prices"])
    targets = [planner.parse_target(t, catalog) for t in p["targets"]]
    if not targets:
        raise UserError("plan.targets is empty: name at least one target, e.g. 'plan.targets=[8xh100,tpu-v5p-64]'")
    mfu = dict(p["mfu"] or {})
    unknown = sorted(set(mfu) - set(catalog["chips"]))
    if unknown:
        raise UserError(f"plan.mfu names unknown chips {unknown}; chips are {sorted(catalog['chips'])}")
    if p["measure"]:
        from launch.plan_measure import measure
        found = measure(p, catalog)
        log.info("measured: %s", found["summary"])
        if found["chip"]:
            mfu[found["chip"]] = found["mfu"]
    settings = planner.Settings(seq_len=p["seq_len"], global_batch=p["global_batch"], micro_batch=p["micro_batch"],
                                precision=p["precision"], remat=p["remat"], overlap=p["overlap"], mfu=mfu,
                                loss_chunk=p["loss_chunk"])
    check_settings(settings)
    rows = [planner.plan_target(cfg, t, catalog, settings) for t in targets]
    rows = planner.finish(rows, p["tokens"], p["tokens_per_s"], p["hours"])
    notes = planner.assumptions(catalog, settings, {r["chip"] for r in rows})
    if not any(r["fits"] for r in rows):
        smallest = planner.smallest_holding(cfg, catalog, settings)
        notes.append("fits on none of the targets; smallest that would hold it: " +
                     (f"{smallest['target']} ({smallest['per_device_gb']:.1f} GB a device, with remat)"
                      if smallest else "none up to 4,096 chips"))
        for r in rows:
            r["smallest_fitting_target"] = smallest["target"] if smallest else None
    winner = next((r for r in rows if r["fits"] and r["meets_requirement"] and r["usd_per_1m_tokens"] is not None),
                  next((r for r in rows if r["fits"]), None))
    command = launch_command(winner, model_name, p) if winner else None
    (run_dir / "plan.log").write_text(report(rows, notes, command, cfg, p) + "\n")
    out = {"rows": rows, "assumptions": notes, "winner": winner["target"] if winner else None, "command": command}
    (run_dir / "plan.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    (run_dir / "plan_summary.json").write_text(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
    if p["chart"]:
        chart(rows, run_dir / "plan.png", p["tokens"])
    return rows


def model_of(plain: dict):
    from models.spec import LlamaConfig
    hf_dir = plain["plan"]["hf_dir"]
    if hf_dir:
        from models.hf import CONFIG, config_from_hf
        path = Path(hf_dir) / CONFIG
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise UserError(f"plan.hf_dir={hf_dir}: cannot read {path} ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise UserError(f"plan.hf_dir={hf_dir}: {path} is not JSON ({e.msg}, line {e.lineno})") from None
        return config_from_hf(data, str(path)), None
    try:
        return LlamaConfig.from_dict(plain["model"]), plain["model"]["name"]
    except ValueError as e:
        raise UserError(str(e)) from None


def check_budget(p: dict) -> None:
    for key in ("tokens", "tokens_per_s", "hours"):
        if p[key] is not None and not p[key] > 0:
            raise UserError(f"plan.{key}={p[key]}: give a positive number (or leave it out)")
    if p["hours"] is not None and p["tokens"] is None:
        raise UserError("plan.hours is a deadline for plan.tokens: set plan.tokens too")
    if not 0 <= p["overlap"] <= 1:
        raise UserError(f"plan.overlap={p['overlap']}: give a share between 0 and 1")
    if p["remat"] not in ("auto", True, False):
        raise UserError(f"plan.remat={p['remat']!r}: use auto, true or false")


def check_settings(s) -> None:
    for key in ("seq_len", "global_batch"):
        if getattr(s, key) < 1:
            raise UserError(f"plan.{key}={getattr(s, key)}: give a positive integer")
    if s.loss_chunk < 0:
        raise UserError(f"plan.loss_chunk={s.loss_chunk}: use 0 (the whole logits) or a number of tokens")
    if s.micro_batch is not None and (s.micro_batch < 1 or s.global_batch % s.micro_batch):
        raise UserError(f"plan.micro_batch={s.micro_batch} must be positive and divide plan.global_batch "
                        f"({s.global_batch})")
    for chip, value in s.mfu.items():
        if not 0 < float(value) <= 1:
            raise UserError(f"plan.mfu.{chip}={value}: give a share between 0 and 1")


def launch_command(row: dict, model_name: str | None, p: dict) -> str:
    """The command that trains the plan on the winner: launch.render for clusters, launch.train on one node."""
    train = [f"model={model_name}" if model_name else "model=...", f"trainer.seq_len={p['seq_len']}",
             f"trainer.global_batch={p['global_batch']}", f"trainer.micro_batch={row['micro_batch']}",
             f"trainer.precision={p['precision']}", f"trainer.remat={str(row['remat']).lower()}"]
    if p["loss_chunk"] != TrainerConfig.loss_chunk:
        train.append(f"trainer.loss_chunk={p['loss_chunk']}")
    if not model_name:
        train.insert(1, f"trainer.init_from={p['hf_dir']}")
    chip, inst, nodes = row["chip"], row["instance_type"], row["nodes"]
    if chip in ("v5e", "v5p", "v6e"):
        args = ["gke-tpu", "--accelerator-type", inst.removeprefix("tpu-"), "--image", "IMAGE"]
    elif chip in ("trn1", "trn2"):
        args = ["eks-trainium", "--instance", inst, "--nodes", str(nodes), "--image", "IMAGE"]
    elif inst is None:
        return shlex.join(["torchrun", "--standalone", "--nproc-per-node", str(row["devices"]), "-m",
                           "launch.train", "hal=torch", "hal.platform=gpu", *train])
    else:
        cloud = "gke" if inst.startswith("a3-") else "eks"
        args = ["gpu", "--cloud", cloud, "--instance", inst, "--nodes", str(nodes), "--image", "IMAGE"]
    return shlex.join(["python", "-m", "launch.render", *args, "--", *train])


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def report(rows: list[dict], notes: list[str], command: str | None, cfg, p: dict) -> str:
    from models.spec import num_params
    lines = [f"model: {num_params(cfg) / 1e9:.3f}B params, seq_len {p['seq_len']}, global batch "
             f"{p['global_batch']}, {p['precision']}" + (f", budget {p['tokens']:.3g} tokens" if p["tokens"] else "")
             + (f" within {p['hours']} h" if p["hours"] else "")
             + (f", target {p['tokens_per_s']:.3g} tokens/s" if p["tokens_per_s"] else "")]
    head = ("rank", "target", "chips", "stack", "mesh d/f/t", "fits", "GB/dev (no remat | remat) / budget",
            "remat", "max micro", "tokens/s", "$/h", "$/1M tok", "hours", "$ total", "price source")
    table = [head]
    for r in rows:
        m = r["mesh"]
        price = r["price"]
        table.append((str(r["rank"]), r["target"], f"{r['chips']} {r['chip']}", r["framework"],
                      f"{m['data']}/{m['fsdp']}/{m['tensor']}", "yes" if r["fits"] else "NO",
                      f"{r['per_device_gb_no_remat']:.1f} | {r['per_device_gb_remat']:.1f} / {r['device_budget_gb']:.1f}",
                      "on" if r["remat"] else "off", _fmt(r["largest_micro_batch"], "d"),
                      _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["usd_per_hour"], ".2f", "NO PRICE"),
                      _fmt(r["usd_per_1m_tokens"], ".3f"), _fmt(r["hours"], ",.1f"), _fmt(r["usd_total"], ",.0f"),
                      f"{price['region']} {price['date']}" if price else "no on-demand price"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for r in rows:
        extra = [r["note"]] if r["note"] else []
        extra.append(f"mesh: {r['mesh_source']}")
        extra += r["problems"]
        if r["price"] is None and r.get("instance_type"):
            extra.append("no on-demand price in the price table (plan.prices=YOUR.yaml adds one)")
        elif r["price"] and r["price"].get("note"):
            extra.append(f"price: {r['price']['note']}")
        lines.append(f"  {r['target']}: " + "; ".join(extra))
    lines.append("assumptions:")
    lines += [f"  - {n}" for n in notes]
    lines.append(f"launch: {command}" if command else "launch: nothing fits; see the smallest target above")
    text = "\n".join(lines)
    print(text)
    return text


def chart(rows: list[dict], path: Path, tokens: float | None) -> None:
    """Cost vs time of the budget per target (or $/1M tokens vs tokens/s without a budget)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if tokens and r["hours"] and r["usd_total"]:
            x, y = r["hours"], r["usd_total"]
        elif not tokens and r["tokens_per_s"] and r["usd_per_1m_tokens"]:
            x, y = 1e6 / r["tokens_per_s"] / 3600, r["usd_per_1m_tokens"]
        else:
            continue
        ax.scatter([x], [y])
        ax.annotate(r["target"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("hours to train the budget" if tokens else "hours per 1M tokens")
    ax.set_ylabel("USD for the budget" if tokens else "USD per 1M tokens")
    ax.set_title("launch.plan: cost vs time (fitting, priced targets)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@hydra.main(config_path="pkg://configs", config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(to_plain(cfg), Path(HydraConfig.get().runtime.output_dir))
    except UserError as e:
        _fail(str(e))


def argv_with_measure(argv: list[str]) -> list[str]:
    """--measure is plan.measure=true."""
    return ["plan.measure=true" if a == "--measure" else a for a in argv]


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *argv_with_measure(sys.argv[1:])]
    precheck(sys.argv[1:])
    main()
