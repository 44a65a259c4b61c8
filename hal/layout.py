"""The checkpoint vocabulary: how the train state is named in storage, what a manifest holds, and the one
check of what was read against it. Framework-free (NumPy only), so trainer/ and launch/ use it too.

Storage names:  params/<name>   a parameter (canonical HF Llama name, models.spec)
                opt/mu/<name>   AdamW's first moment of that parameter
                opt/nu/<name>   AdamW's second moment
                opt/count       the number of optimizer updates applied (int32 scalar)

A manifest (manifest.json) is a JSON object with at least `format_version`, `step` and `tensors`:
{storage name: {"shape": [int, ...], "dtype": str, "digest": int}}, the digest being hal.store's
sharding-independent 64-bit sum.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from models.errors import CheckpointDamaged, UserError

FORMAT_VERSION = 1

PARAMS = "params/"
MU = "opt/mu/"
NU = "opt/nu/"
COUNT = "opt/count"
COUNT_DTYPE = np.int32


def param_key(name: str) -> str:
    return PARAMS + name


def mu_key(name: str) -> str:
    return MU + name


def nu_key(name: str) -> str:
    return NU + name


class Groups(NamedTuple):
    """A flat state split by role: {canonical name: value} three times, and the update count."""
    params: dict
    mu: dict
    nu: dict
    count: object


def join(params: Mapping, mu: Mapping, nu: Mapping, count=None) -> dict:
    """{storage name: value}: params, then the moments, then opt/count (the order checkpoints list them
    in); without a count, opt/count is left out."""
    out = {param_key(k): v for k, v in params.items()}
    out.update({mu_key(k): v for k, v in mu.items()})
    out.update({nu_key(k): v for k, v in nu.items()})
    if count is not None:
        out[COUNT] = count
    return out


def split(tensors: Mapping) -> Groups:
    """The inverse of join (opt/count is None when absent)."""
    def group(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return Groups(group(PARAMS), group(MU), group(NU), tensors.get(COUNT))


def state_shapes(param_shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """{storage name: shape} of a whole train state for a model's {canonical name: shape}."""
    shapes = {k: tuple(s) for k, s in param_shapes.items()}
    return join(shapes, shapes, shapes, ())


def model_mismatch(manifest_tensors: Mapping, expected: Mapping[str, tuple]) -> str | None:
    """How a manifest's tensors differ from a model's {storage name: shape} (names, then shapes), or None."""
    missing = [n for n in expected if n not in manifest_tensors]
    extra = [n for n in manifest_tensors if n not in expected]
    if missing:
        return f"it lacks {len(missing)} tensor(s) of the model, e.g. {missing[0]}"
    if extra:
        return f"it holds {len(extra)} tensor(s) the model does not have, e.g. {extra[0]}"
    for n, shape in expected.items():
        if tuple(manifest_tensors[n]["shape"]) != tuple(shape):
            return f"tensor {n} is {list(manifest_tensors[n]['shape'])} there, {list(shape)} in the model"
    return None


def check_manifest(manifest, name) -> None:
    """Raise unless `manifest` (parsed JSON) is what trichip writes: CheckpointDamaged naming checkpoint
    `name` for anything malformed; a plain UserError for another format version (a newer trichip's)."""
    if not isinstance(manifest, dict):
        raise CheckpointDamaged(f"checkpoint {name} is damaged: its manifest is a JSON {type(manifest).__name__}, "
                                f"not an object")
    version = manifest.get("format_version")
    if not _is_int(version):
        raise CheckpointDamaged(f"checkpoint {name} is damaged: its manifest's format_version is {version!r}")
    if version != FORMAT_VERSION:
        raise UserError(f"checkpoint {name} has format version {version}; this trichip reads version {FORMAT_VERSION}")
    if not _is_int(manifest.get("step")) or manifest["step"] < 0:
        raise CheckpointDamaged(f"checkpoint {name} is damaged: its manifest's step is {manifest.get('step')!r}")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        raise CheckpointDamaged(f"checkpoint {name} is damaged: its manifest lists no tensors")
    for tensor, entry in tensors.items():
        problem = _entry_problem(entry)
        if problem:
            raise CheckpointDamaged(f"checkpoint {name} is damaged: its manifest entry for tensor {tensor} {problem}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return "is not an object"
    shape, dtype, digest = entry.get("shape"), entry.get("dtype"), entry.get("digest")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        return f"has shape {shape!r}"
    if not isinstance(dtype, str) or not dtype:
        return f"has dtype {dtype!r}"
    if not _is_int(digest) or not 0 <= digest < 2**64:
        return f"has digest {digest!r}"
    return None


def verify(manifest_tensors: Mapping, found: Mapping, name) -> None:
    """Check every tensor the manifest lists against what was read: present, same shape, dtype, digest.

    found: {storage name: {"shape", "dtype", "digest"}} of what was read (Backend.load, hal.store.summarize).
    Raises CheckpointDamaged naming checkpoint `name` and the first tensor that differs."""
    for tensor, want in manifest_tensors.items():
        got = found.get(tensor)
        if got is None:
            problem = "is missing"
        elif list(got["shape"]) != list(want["shape"]) or got["dtype"] != want["dtype"]:
            problem = f"is {got['dtype']} {list(got['shape'])}; the manifest says {want['dtype']} {list(want['shape'])}"
        elif got["digest"] != want["digest"]:
            problem = f"has digest {got['digest']}; the manifest says {want['digest']}"
        else:
            continue
        raise CheckpointDamaged(f"checkpoint {name} is damaged: tensor {tensor} {problem}")
