"""Persistent compile caches, so a restart on the same machine skips most of its compiling.

One setting, `hal.compile_cache_dir`, for every framework:
- null or "": a directory per user under the trichip cache ($TRICHIP_CACHE, default ~/.cache/trichip):
  `<cache>/compile/<user>/jax` for XLA's compilation cache, `.../inductor` for torch inductor's FX graph and
  AOTAutograd caches (and the Triton kernels inductor keeps beside them). A cache directory named by the
  framework's own variable (JAX_COMPILATION_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR) is used instead.
- a path: the same two subdirectories under it.
- "off" (or false): no persistent compile cache.
"""
from __future__ import annotations

import getpass
import os
from pathlib import Path

OFF = ("off", "false", "none")
SUBDIR = {"jax": "jax", "torch": "inductor"}
ENV = {"jax": "JAX_COMPILATION_CACHE_DIR", "torch": "TORCHINDUCTOR_CACHE_DIR"}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):         # no name for this uid (some containers)
        return f"uid{os.getuid()}" if hasattr(os, "getuid") else "user"


def default_root() -> Path:
    """<$TRICHIP_CACHE or ~/.cache/trichip>/compile/<user>: per user, as the cache dir may be shared."""
    cache = Path(os.environ.get("TRICHIP_CACHE", Path.home() / ".cache" / "trichip"))
    return cache / "compile" / _user()


def directory(setting, framework: str) -> Path | None:
    """The compile cache directory of `framework` for hal.compile_cache_dir = `setting`; None when off."""
    value = "" if setting is None else str(setting).strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser().absolute() / SUBDIR[framework]
    if os.environ.get(ENV[framework]):
        return Path(os.environ[ENV[framework]]).expanduser().absolute()
    return default_root() / SUBDIR[framework]


def configure_jax(jax, setting) -> Path | None:
    """XLA's persistent compilation cache at directory(setting, "jax"): every program cached, however fast it
    compiled and however small (CPU programs compile in well under JAX's default 1 s threshold). JAX opens
    its cache once per process, at the first compile: a later backend asking for another directory resets it."""
    from jax.experimental.compilation_cache import compilation_cache
    path = directory(setting, "jax")
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def configure_torch(setting) -> Path | None:
    """torch inductor's on-disk caches at directory(setting, "torch"): the FX graph cache (compiled kernels by
    graph) and the AOTAutograd cache (forward/backward graphs), which torch.compile reads before compiling.
    Inductor reads TORCHINDUCTOR_CACHE_DIR whenever it looks for its cache, so setting it here is enough."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    path = directory(setting, "torch")
    enabled = path is not None
    inductor_config.fx_graph_cache = enabled
    functorch_config.enable_autograd_cache = enabled
    if enabled:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path
