"""python -m launch.plot RUN_DIR [RUN_DIR ...] [--out loss.png] [--metric loss] [--labels A B ...]

Overlays one metric of several runs (from each run's metrics.jsonl) in one PNG. With the default
metric, loss, each run's eval_loss is drawn as markers in the run's colour where it was measured.
A run's label defaults to "<framework> <run dir name>": the framework that wrote its latest
checkpoint, else hal.framework from its .hydra/config.yaml, else just the dir name.

Anything the user must change (a dir without metrics.jsonl, a metric no run has, a label count that
does not match) ends in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from hal import UserError

EXIT_USER_ERROR = 2
METRICS = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s")
UNITS = {"loss": "loss (nats/token)", "eval_loss": "eval loss (nats/token)", "lr": "learning rate",
         "grad_norm": "gradient norm (before clipping)", "tokens_per_s": "tokens / s"}
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")


@dataclass
class Run:
    path: Path
    label: str
    rows: list[dict]

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[metric]) for r in self.rows if r.get(metric) is not None]
        return [s for s, _ in points], [v for _, v in points]


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list of dicts. A half-written last line (a run still training, or killed
    mid-write) is skipped; a bad line anywhere else is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; pass a trichip run directory "
                        f"(the run_dir of python -m launch.train)")
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1} is not a JSON object ({line[:60]!r}); the file is damaged") from None
    return rows


def framework_of(run_dir: Path) -> str | None:
    """The framework that wrote the run's latest checkpoint, else its config's hal.framework."""
    from trainer import checkpoint
    try:
        writer = checkpoint.read_manifest(checkpoint.resolve(run_dir)).get("writer", {})
        if writer.get("framework"):
            return writer["framework"]
    except UserError:
        pass  # no (readable) checkpoint yet: fall back to the config
    config = Path(run_dir) / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf
        try:
            return OmegaConf.select(OmegaConf.load(config), "hal.framework")
        except Exception:  # an unreadable config only costs the label its framework
            return None
    return None


def default_label(run_dir: Path) -> str:
    name = Path(run_dir).resolve().name
    framework = framework_of(run_dir)
    return f"{framework} {name}" if framework else name


def load_runs(run_dirs: list[str], labels: list[str] | None = None) -> list[Run]:
    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"--labels has {len(labels)} label(s) for {len(run_dirs)} run dir(s); give one label per run dir")
    return [Run(Path(d), labels[i] if labels else default_label(Path(d)), read_metrics(Path(d)))
            for i, d in enumerate(run_dirs)]


def plot(runs: list[Run], metric: str, out: Path) -> Path:
    """Write the PNG; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not any(run.series(metric)[0] for run in runs):
        raise UserError(f"no run has {metric} in its metrics.jsonl"
                        + ("; set trainer.eval_every > 0 to record it" if metric == "eval_loss" else ""))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for i, run in enumerate(runs):
        # Runs that agree (the same model on two frameworks) draw on top of each other: a line style
        # and a marker shape per run keep every one of them visible.
        style = dict(color=f"C{i % 10}", linestyle=LINESTYLES[i % len(LINESTYLES)])
        marker = MARKERS[i % len(MARKERS)]
        steps, values = run.series(metric)
        if metric == "eval_loss":   # sparse: points joined by a line
            ax.plot(steps, values, marker=marker, label=run.label, **style)
            continue
        ax.plot(steps, values, linewidth=1.5, label=run.label, **style)
        if metric == "loss":
            eval_steps, eval_values = run.series("eval_loss")
            if eval_steps:
                ax.plot(eval_steps, eval_values, color=style["color"], linestyle="none", marker=marker,
                        markersize=max(9 - 2 * i, 4), markeredgecolor="black", label=f"{run.label} (eval)")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(UNITS[metric])
    if metric in ("tokens_per_s", "lr"):
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(metric if len(runs) == 1 else f"{metric}: {len(runs)} runs")
    fig.tight_layout()
    out = Path(out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line and exit 2 (in main), like every other user error
        raise UserError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m launch.plot", description=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--metric", choices=METRICS, default="loss")
    parser.add_argument("--out", help="PNG to write (default: <metric>.png)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL", help="one legend label per run dir")
    try:
        args = parser.parse_args(argv)
        out = plot(load_runs(args.run_dirs, args.labels), args.metric, Path(args.out or f"{args.metric}.png"))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
