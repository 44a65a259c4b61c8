"""Tensor storage for checkpoints: orbax-checkpoint (OCDBT over tensorstore), read back as NumPy.

Tensors are written as one nested tree keyed by the storage names of HostState.tensors()
("params/model/layers/0/...") so any framework can read them without knowing who wrote them.
"""
from __future__ import annotations

import os

import numpy as np

from models.spec import flatten, nest


def _nested(tensors: dict[str, np.ndarray]) -> dict:
    return nest({name.replace("/", "."): value for name, value in tensors.items()})


def write_tensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Write {storage name: array} under `path` (which must not exist yet)."""
    import orbax.checkpoint as ocp
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), _nested(tensors))


def read_tensors(path: str, names: list[str]) -> dict[str, np.ndarray]:
    """Read the named tensors back as host NumPy arrays."""
    import jax
    import orbax.checkpoint as ocp
    like = _nested({n: 0 for n in names})
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), like)
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.abspath(path), restore_args=restore_args)
    flat = flatten(tree)
    return {n: np.asarray(flat[n.replace("/", ".")]) for n in names}
