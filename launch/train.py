"""python -m launch.train hal=<jax|torch> model=<size> [trainer.steps=N ...] — one Hydra app for every chip.

Anything the user must change (a bad override, path, size or checkpoint) ends in one line on stderr
and exit code 2, before any compute.
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hal import UserError

EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if "Available options" in text:
        options = [ln.strip() for ln in text.split("Available options", 1)[1].splitlines()[1:]
                   if ln.startswith("\t")]
        first += f" (available: {', '.join(options)})"
    return first


def precheck(argv: list[str]) -> None:
    """Compose the config from the command line once, so a bad override is one line, not a traceback."""
    if any(a in ("-m", "--multirun") or a.startswith("--") for a in argv):
        return  # sweeps and Hydra's own flags: Hydra reports those itself
    from hydra import compose, initialize_config_module
    overrides = [a for a in argv if not a.startswith("hydra")]
    try:
        with initialize_config_module("configs", version_base="1.3"):
            compose("train", overrides=overrides)
    except Exception as e:  # Hydra's composition and override errors have no common base class
        _fail(_one_line(e))


@hydra.main(config_path="pkg://configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from trainer.loop import train
    for noisy in ("absl", "jax._src", "orbax"):   # orbax logs every save at INFO through absl
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:
        _fail(_one_line(e).replace("Missing mandatory value: ", "missing value for ") +
              " (set it on the command line, e.g. data.path=tokens.npy)")
    try:
        return train(plain, HydraConfig.get().runtime.output_dir, OmegaConf.to_yaml(cfg, resolve=True))
    except UserError as e:
        logging.getLogger("trichip").error("%s", e)
        _fail(str(e))


if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
