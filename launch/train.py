"""python -m launch.train hal=<jax|torch> model=<size> [trainer.steps=N ...] — one Hydra app for every chip.

Anything the user must change (a bad override, path, size or checkpoint) ends in one line on stderr
and exit code 2, before any compute.
"""
from __future__ import annotations

from trainer import goodput  # noqa: I001  (first: its import time is the clock's origin where /proc is missing)

import logging
import os
import sys
import threading

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from configs.schema import compose, explain, to_plain
from hal import UserError

EXIT_USER_ERROR = 2


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def config_error(overrides: list[str]) -> tuple[str | None, str]:
    """(the one-line error of these overrides, or None; the run dir they name). Composition errors come
    from the schema (configs/schema.py), ranges and auto-or-boolean keys from trainer.loop.check_config."""
    from trainer.loop import check_config
    try:
        cfg = compose(overrides, resolve=True)
        check_config({k: v for k, v in cfg.items() if k != "run_dir"})
    except UserError as e:
        return str(e), ""
    except Exception as e:  # Hydra's composition and override errors have no common base class
        return explain(e), ""
    return None, cfg["run_dir"]


def precheck(argv: list[str]) -> None:
    """Compose the config from the command line once, so a bad override is one line, not a traceback; then
    lock an existing run dir before Hydra writes its .hydra/ into it (a refused run must not overwrite the
    resolved config of the run that holds it)."""
    if any(a in ("-m", "--multirun") or a.startswith("--") for a in argv):
        return  # sweeps and Hydra's own flags: Hydra reports those itself
    error, run_dir = config_error([a for a in argv if not a.startswith("hydra")])
    if error:
        _fail(error)
    from trainer.loop import check_run_dir
    from trainer.safety import RunLock
    if any(a.startswith("hydra.run.dir=") for a in argv):
        return      # Hydra names the directory itself
    # A run_dir given on the command line is made and locked now; the default one (a timestamp Hydra resolves
    # again a moment later) only when it exists already.
    explicit = any(a.startswith("run_dir=") for a in argv)
    try:
        check_run_dir(run_dir)              # before Hydra writes into it: a foreign directory stays untouched
        if int(os.environ.get("RANK", "0")) == 0 and (explicit or os.path.isdir(run_dir)):
            RunLock(run_dir).acquire()      # held until the process ends; train() takes it again
    except UserError as e:
        _fail(str(e), e.exit_code)


def _quiet_closed_loop_callbacks() -> None:
    """After a failed orbax write, tensorstore still calls back into orbax's closed asyncio loop, and each
    callback prints 'RuntimeError: Event loop is closed' with a traceback. They carry no information the
    one-line error lacks; they go to the log file."""
    default_hook, default_excepthook = sys.unraisablehook, sys.excepthook

    def closed_loop(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    def unraisable(u):
        if closed_loop(u.exc_value):
            logging.getLogger("trichip").debug("ignored after a failed write: %s", u.exc_value)
        elif isinstance(u.exc_value, OSError):     # e.g. a writer's exit-time flush to a full disk
            logging.getLogger("trichip").warning("%s: %s", u.err_msg or "ignored", u.exc_value)
        else:
            default_hook(u)

    def excepthook(kind, value, tb):
        if not closed_loop(value):
            default_excepthook(kind, value, tb)

    def thread_excepthook(args):     # a writer thread that hit a full disk: one line; the run reports the rest
        if isinstance(args.exc_value, OSError):
            logging.getLogger("trichip").warning("thread %s stopped: %s", getattr(args.thread, "name", "?"),
                                                 args.exc_value.strerror or args.exc_value)
        elif not closed_loop(args.exc_value):
            default_thread_hook(args)
    default_thread_hook = threading.excepthook
    sys.unraisablehook, sys.excepthook, threading.excepthook = unraisable, excepthook, thread_excepthook


_STARTED = []


def _clock() -> goodput.Clock:
    """The time accounting of a run: the process's first run counts from the process start (interpreter,
    imports and Hydra are its startup); a sweep's later runs (--multirun) from their own start."""
    clock = goodput.Clock() if _STARTED else goodput.Clock.from_process_start()
    _STARTED.append(clock)
    return clock


@hydra.main(config_path="pkg://configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from trainer.loop import train
    logging.raiseExceptions = False     # a log file on a full disk must not print tracebacks: the error says it
    for noisy in ("absl", "jax._src", "orbax"):   # orbax logs every save at INFO through absl
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_closed_loop_callbacks()
    for handler in logging.getLogger().handlers:   # library tracebacks go to the log file, not the terminal
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(lambda record: not record.name.startswith(("absl", "orbax", "jax")))
    try:
        return train(to_plain(cfg), HydraConfig.get().runtime.output_dir, OmegaConf.to_yaml(cfg, resolve=True),
                     clock=_clock())
    except UserError as e:   # exit codes: 2 fix the input, 3 checkpoint write failed, 4 non-finite loss
        logging.getLogger("trichip").error("%s", e)
        _fail(str(e), e.exit_code)


def require_shared_run_dir(argv: list[str]) -> None:
    """Several processes resolve `${now:...}` each on its own clock: they must be given one run dir."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not any(
            a.startswith(("run_dir=", "hydra.run.dir=")) for a in argv):
        _fail("a multi-process run needs an explicit run_dir=... shared by every process")


if __name__ == "__main__":
    require_shared_run_dir(sys.argv[1:])
    precheck(sys.argv[1:])
    main()
