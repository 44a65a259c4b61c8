"""Checkpoint policy and layout: one format for every backend.

    checkpoints/<step>/manifest.json   format version, step, data cursor, RNG, model spec, who wrote it,
                                       and every tensor's shape, dtype and digest
    checkpoints/<step>/config.yaml     the resolved run config
    checkpoints/<step>/state/          the tensors (orbax-checkpoint, OCDBT), see hal.store

A checkpoint is assembled in checkpoints/.tmp-<step>/ and renamed into place only when
complete, so a crash mid-save never leaves a directory named like a step; leftovers are removed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hal.base import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, step: int, backend, meta: dict, config_yaml: str = "") -> Path:
    """Write checkpoint `step` under root atomically; returns its directory.

    Collective: every process calls it. Each writes the shards it holds into checkpoints/.tmp-<step>/;
    process 0 then writes the manifest (with every tensor's digest) and renames the directory into place.
    """
    root = Path(root)
    final, tmp = root / str(step), root / f".tmp-{step}"
    lead = backend.process_index == 0
    if lead:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)     # a crashed earlier attempt at this step
        tmp.mkdir()
    backend.barrier(f"checkpoint-{step}-start")
    try:
        tensors = backend.save(str(tmp / "state"))
        if lead:
            manifest = dict(meta, format_version=FORMAT_VERSION, step=step, tensors=tensors)
            (tmp / "config.yaml").write_text(config_yaml)
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():       # the same step saved again (a resumed run's last step): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    backend.barrier(f"checkpoint-{step}-done")
    return final


def list_steps(root: Path) -> list[int]:
    """Steps of complete checkpoints under root, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir()
                  if p.name.isdigit() and (p / MANIFEST).is_file())


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove older ones and abandoned temp dirs."""
    root = Path(root)
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
        manifest = json.loads((Path(ckpt) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt}: cannot read {MANIFEST} ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {ckpt} has format version {manifest.get('format_version')}; "
                        f"this trichip reads version {FORMAT_VERSION}")
    return manifest


def load(ckpt: Path, backend) -> dict:
    """Restore a checkpoint into the backend (collective), verifying every tensor's digest against the
    manifest. Returns the manifest."""
    manifest = read_manifest(ckpt)
    found = backend.load(str(Path(ckpt) / "state"), manifest["tensors"])
    for name, digest in found.items():
        if manifest["tensors"][name]["digest"] != digest:
            raise UserError(f"checkpoint {ckpt}: tensor {name} does not match its manifest digest; "
                            f"the checkpoint is damaged")
    return manifest
