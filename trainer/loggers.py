"""Where a run's numbers go besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow (trainer.loggers).

Every logger receives the same things from process 0: the resolved config once, the scalars of every
metrics line (`observe.scalar_values`: the tags TensorBoard shows) and samples of text. A tracker is
imported only when the run asks for it; one that is not installed is a one-line error naming its package.
A tracker that fails while the run goes on (a server that went away) is dropped with a warning:
metrics.jsonl stays the record of the run.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from models.errors import UserError, first_line
from trainer.observe import Scalars, scalar_values

log = logging.getLogger("trichip")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny (or mlflow)"}


class Logger:
    """One destination: `config` once at the start, `add` every step, `text` now and then, `close` at the end."""
    name = "logger"

    def config(self, cfg: dict) -> None:
        """The resolved config (a plain dict)."""

    def add(self, step: int, values: dict) -> None:
        """A metrics line (its numeric keys are logged)."""

    def text(self, step: int, tag: str, text: str) -> None:
        """A sample of text at this step."""

    def close(self) -> None:
        """Flush and end the run on the tracker's side."""


class TensorBoard(Logger):
    """observe.Scalars behind the Logger interface: its errors are the run's (a full disk stops the run)."""
    name = "tensorboard"

    def __init__(self, run_dir: Path):
        self.scalars = Scalars(run_dir)

    def config(self, cfg: dict) -> None:
        from omegaconf import OmegaConf
        self.scalars.config(OmegaConf.to_yaml(cfg))

    def add(self, step: int, values: dict) -> None:
        self.scalars.add(step, values)

    def text(self, step: int, tag: str, text: str) -> None:
        self.scalars.text(step, tag, text)

    def close(self) -> None:
        self.scalars.close()


class Wandb(Logger):
    """A Weights & Biases run named after the run dir, with the trichip run id as its id, so a resumed run
    continues the same W&B run. WANDB_MODE=offline writes it under run_dir/wandb/ for `wandb sync`."""
    name = "wandb"

    def __init__(self, run_dir: Path, run_id: str, project: str):
        import wandb
        self.wandb = wandb
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False)
        self.run = wandb.init(project=project, name=Path(run_dir).name, id=run_id, resume="allow",
                              dir=str(run_dir), settings=settings)

    def config(self, cfg: dict) -> None:
        self.run.config.update(cfg, allow_val_change=True)

    def add(self, step: int, values: dict) -> None:
        self.run.log(scalar_values(values), step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{_escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow(Logger):
    """An MLflow run in experiment `trainer.experiment`, tagged with the trichip run id (a resumed run finds
    and continues it). Tracking URI: MLFLOW_TRACKING_URI, else a file store in run_dir/mlruns. The config
    goes in as flattened params (when the MLflow run is created) and as the artifact config.json; samples
    of text as artifacts sample/step-<N>.txt."""
    name = "mlflow"
    TAG = "trichip.run_id"

    def __init__(self, run_dir: Path, run_id: str, experiment: str):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        self.Metric, self.Param = Metric, Param
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:     # MLflow 3 keeps its file store working only when asked: this default asks for it
            uri = (Path(run_dir).resolve() / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`{self.TAG}` = '{run_id}'", max_results=1)
        self.new = not runs
        self.run_id = runs[0].info.run_id if runs else self.client.create_run(
            exp_id, run_name=Path(run_dir).name, tags={self.TAG: run_id}).info.run_id
        if not self.new:
            self.client.update_run(self.run_id, status="RUNNING")

    def config(self, cfg: dict) -> None:
        if self.new:        # MLflow refuses to change a logged param: a resumed run keeps the first values
            params = [self.Param(k, v[:6000]) for k, v in _flatten(cfg).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, cfg, "config.json")

    def add(self, step: int, values: dict) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, float(v), now, step)
                                                    for k, v in scalar_values(values).items()])

    def text(self, step: int, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step-{step:08d}.txt")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _flatten(cfg: dict, prefix: str = "") -> dict[str, str]:
    """{"trainer.steps": "300", ...}: MLflow params are flat strings."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, bool)) or v is None else str(v)
    return out


def _require(name: str) -> None:
    import importlib
    try:
        importlib.import_module(name)
    except ImportError:
        raise UserError(f"trainer.loggers names {name}, but the {name} package is not installed: "
                        f"pip install {PACKAGES[name].split(' ')[0]} (or pip install 'trichip[track]'), "
                        f"or drop it from trainer.loggers") from None


class Loggers:
    """The run's loggers (trainer.loggers) as one: each call goes to every logger. TensorBoard's errors are
    raised (they are the run dir's); a tracker's drop that tracker with a warning."""

    def __init__(self, names, run_dir: Path, run_id: str, experiment: str = "trichip", tensorboard: bool = True):
        self.loggers: list[Logger] = []
        for name in dict.fromkeys(str(n) for n in names):         # each once, in the order given
            if name == "tensorboard":
                if tensorboard:
                    self.loggers.append(TensorBoard(run_dir))
                continue
            if name not in PACKAGES:
                raise UserError(f"trainer.loggers: unknown logger {name!r}; use tensorboard, wandb or mlflow")
            _require(name)
            try:
                self.loggers.append(Wandb(run_dir, run_id, experiment) if name == "wandb"
                                    else Mlflow(run_dir, run_id, experiment))
            except Exception as e:  # noqa: BLE001  (each tracker has its own error types)
                self.close()
                raise UserError(f"trainer.loggers: {name} could not start a run ({first_line(e)}); check its "
                                f"settings (e.g. WANDB_MODE=offline, MLFLOW_TRACKING_URI) or drop it") from None

    def _each(self, method: str, *args) -> None:
        for logger in list(self.loggers):
            if isinstance(logger, TensorBoard):
                getattr(logger, method)(*args)
                continue
            try:
                getattr(logger, method)(*args)
            except Exception as e:  # noqa: BLE001
                log.warning("%s failed (%s): no more %s logging in this run", logger.name, first_line(e),
                            logger.name)
                self.loggers.remove(logger)

    def config(self, cfg: dict) -> None:
        self._each("config", cfg)

    def add(self, step: int, values: dict) -> None:
        self._each("add", step, values)

    def text(self, step: int, tag: str, text: str) -> None:
        self._each("text", step, tag, text)

    def close(self) -> None:
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as e:  # noqa: BLE001  (closing one must not keep the others open)
                log.warning("%s did not close cleanly: %s", logger.name, first_line(e))
        self.loggers = []
