"""Checkpoint policy and layout: one format for every backend.

    checkpoints/<step>/manifest.json   format version, step, data cursor, RNG, model spec, who wrote it,
                                       and every tensor's shape, dtype and crc32
    checkpoints/<step>/config.yaml     the resolved run config
    checkpoints/<step>/state/          the tensors (orbax-checkpoint, OCDBT), see hal.store

A checkpoint is assembled in checkpoints/.tmp-<step>-<random>/ and renamed into place only when
complete, so a crash mid-save never leaves a directory named like a step; leftovers are removed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

from hal.base import HostState, UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def crc32(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, step: int, state: HostState, meta: dict, config_yaml: str = "") -> Path:
    """Write checkpoint `step` under root atomically; returns its directory."""
    from hal import store
    root.mkdir(parents=True, exist_ok=True)
    final = root / str(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{step}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is as readable as the run dir
    try:
        tensors = state.tensors()
        store.write_tensors(str(tmp / "state"), tensors)
        manifest = dict(meta, format_version=FORMAT_VERSION, step=step, tensors={
            name: {"shape": list(a.shape), "dtype": str(a.dtype), "crc32": crc32(a)} for name, a in tensors.items()})
        (tmp / "config.yaml").write_text(config_yaml)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():       # same step saved again (e.g. a resumed run's last step): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_steps(root: Path) -> list[int]:
    """Steps of complete checkpoints under root, ascending."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir()
                  if p.name.isdigit() and (p / MANIFEST).is_file())


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove older ones and abandoned temp dirs."""
    steps = list_steps(root)
    for step in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(root / str(step), ignore_errors=True)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint dir, a checkpoints/ dir or a run dir -> the checkpoint directory to read."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    for root in (p / "checkpoints", p):
        steps = list_steps(root)
        if steps:
            return root / str(steps[-1])
    raise UserError(f"{path} is not a trichip checkpoint (no {MANIFEST}), nor a run or checkpoints "
                    f"directory holding one")


def read_manifest(ckpt: Path) -> dict:
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt}: cannot read {MANIFEST} ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {ckpt} has format version {manifest.get('format_version')}; "
                        f"this trichip reads version {FORMAT_VERSION}")
    return manifest


def load(ckpt: Path) -> tuple[HostState, dict]:
    """Read a checkpoint's state (verifying every tensor against its manifest) and its manifest."""
    from hal import store
    manifest = read_manifest(ckpt)
    tensors = store.read_tensors(str(ckpt / "state"), list(manifest["tensors"]))
    for name, info in manifest["tensors"].items():
        a = tensors[name]
        if list(a.shape) != info["shape"] or str(a.dtype) != info["dtype"] or crc32(a) != info["crc32"]:
            raise UserError(f"checkpoint {ckpt}: tensor {name} does not match its manifest "
                            f"(shape/dtype/checksum); the checkpoint is damaged")
    return HostState.from_tensors(tensors), manifest
