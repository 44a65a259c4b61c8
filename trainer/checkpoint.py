"""Checkpoint policy and layout: one format for every backend.

    checkpoints/<step>/manifest.json   format version, step, data cursor, RNG, model spec, who wrote it,
                                       and every tensor's shape, dtype and digest
    checkpoints/<step>/config.yaml     the resolved run config
    checkpoints/<step>/state/          the tensors (orbax-checkpoint; hal.store says which layout)

A checkpoint is assembled in checkpoints/.tmp-<step>/ and renamed into place only when
complete, so a crash mid-save never leaves a directory named like a step; leftovers are removed.

The checkpoints root may also be an object-store prefix (s3://bucket/prefix, gs://bucket/prefix; see
trainer.remote). A checkpoint is then saved as above into a local staging directory and uploaded file
by file, manifest.json last: on a store, a checkpoint is complete iff its manifest exists, and removing
one deletes the manifest first. Reading one downloads it into a local cache first. Every function here
takes a local path or such a URL (or a trainer.remote.RemotePath) alike.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from hal.base import UserError
from trainer import remote
from trainer.remote import RemotePath, is_remote

log = logging.getLogger("trichip")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def location(path) -> Path | RemotePath:
    """A local path or an object-store URL, as the path type this module works with."""
    return RemotePath(path) if is_remote(path) else Path(path)


def checkpoint_root(checkpoint_dir, run_dir) -> Path | RemotePath:
    """Where a run keeps its checkpoints: trainer.checkpoint_dir (a directory, or an s3:// or gs:// prefix,
    whose bucket and credentials are checked now, before any compute); by default run_dir/checkpoints."""
    if checkpoint_dir in (None, ""):
        return Path(run_dir) / "checkpoints"
    if is_remote(checkpoint_dir):
        path = RemotePath(checkpoint_dir)
        _user_error(lambda: path.store)
        return path
    return Path(str(checkpoint_dir))


def save(root: Path, step: int, backend, meta: dict, config_yaml: str = "", staging=None) -> Path:
    """Write checkpoint `step` under root atomically; returns its directory.

    Collective: every process calls it. Each writes the shards it holds into checkpoints/.tmp-<step>/;
    process 0 then writes the manifest (with every tensor's digest) and renames the directory into place.

    A remote root (s3://, gs://) needs `staging`, a local directory every process can write (the run
    dir's .staging/): the checkpoint is saved there as above, then process 0 uploads it (manifest last)
    and removes the local copy. A failed upload raises remote.RemoteError (an OSError) on every process.
    """
    return PendingSave(root, step, backend, meta, config_yaml, staging, background=False).finish()


class PendingSave:
    """One checkpoint on its way to disk. background=True (trainer.async_save): the state is copied now
    (the only part that blocks training) and written by a thread while training goes on; `finish()`,
    called on every process at the same step, then adds the digests up, writes the manifest and renames
    the directory into place (and uploads it to an object store). Until then the checkpoint is a
    .tmp-<step> directory that a crash leaves behind and the next save or resume removes."""

    def __init__(self, root, step: int, backend, meta: dict, config_yaml: str = "", staging=None,
                 background: bool = True):
        self.step, self.backend, self.meta, self.config_yaml = step, backend, meta, config_yaml
        self.remote = RemotePath(root) if is_remote(root) else None
        if self.remote is not None:
            if staging is None:
                raise ValueError(f"saving to {root} needs a local staging directory")
            root = Path(staging)
        self.root = Path(root)
        self.final, self.tmp = self.root / str(step), self.root / f".tmp-{step}"
        self.lead = backend.process_index == 0
        self.written, self.error, self._thread = None, None, None
        if self.lead:
            if self.remote is not None:
                shutil.rmtree(self.root, ignore_errors=True)     # what a run killed mid-save or mid-upload left
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)          # a crashed earlier attempt at this step
            self.tmp.mkdir()
        backend.barrier(f"checkpoint-{step}-start")
        try:
            write = self._snapshot(background)
            background = background and write is not None
            if write is None:
                write = backend.snapshot(copy=False)
        except BaseException:
            self._cleanup()
            raise
        self.held = getattr(write, "tensors", None)     # the snapshot, where the backend shows it (JAX)
        if background:
            self._thread = threading.Thread(target=self._write, args=(write,), name=f"checkpoint-{step}",
                                            daemon=True)
            self._thread.start()
        else:
            self._write(write)

    def _snapshot(self, background: bool):
        """The background copy, or None where it does not fit (then every process saves blocking)."""
        if not background:
            return None
        write, error = None, None
        try:
            write = self.backend.snapshot(copy=True)
        except (RuntimeError, MemoryError) as e:     # out of device or host memory for a second state
            error = e
        if _on_any_process(self.backend, error is not None):      # every process takes the same path
            log.warning("checkpoint %d: no room for a background copy of the state (%s); this save blocks "
                        "training (trainer.async_save=false avoids the attempt)", self.step,
                        str(error).splitlines()[0][:160] if error else "on another process")
            return None
        return write

    def _write(self, write) -> None:
        try:
            self.written = write(str(self.tmp / "state"))
        except BaseException as e:   # noqa: BLE001  (handed to finish(), on the training thread)
            self.error = e

    def done(self) -> bool:
        """The background write has ended (well or not) on this process."""
        return self._thread is None or not self._thread.is_alive()

    def _cleanup(self) -> None:
        if self.lead:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self):
        """Wait for the write, then commit (collective: every process, same step). Raises the write's
        error on every process if it failed on any (the temp directory is removed)."""
        if self._thread is not None:
            self._thread.join()
        backend = self.backend
        try:
            _agree(backend, self.error, f"the write of checkpoint {self.step}")
            tensors = backend.combine(self.written)
            error = None
            if self.lead:
                try:
                    self._commit(tensors)
                except Exception as e:      # noqa: BLE001  (agreed on below, then raised)
                    error = e
            _agree(backend, error, f"the commit of checkpoint {self.step}")
        except BaseException:
            self._cleanup()
            raise
        backend.barrier(f"checkpoint-{self.step}-done")
        if self.remote is None:
            return self.final
        return self._upload()

    def _commit(self, tensors: dict) -> None:
        """Process 0: manifest (fsync'd), then the rename that makes the checkpoint exist."""
        manifest = dict(self.meta, format_version=FORMAT_VERSION, step=self.step, tensors=tensors)
        (self.tmp / "config.yaml").write_text(self.config_yaml)
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if self.final.exists():       # the same step saved again (a resumed run's last step): replace it
            shutil.rmtree(self.final)
        os.rename(self.tmp, self.final)
        _fsync_dir(self.root)

    def _upload(self) -> RemotePath:
        root, dest, error = self.remote, self.remote / str(self.step), None
        if self.lead:
            try:
                upload(self.final, dest)
            except Exception as e:          # UserError too (credentials expired mid-run): the save policy applies
                error = e if isinstance(e, OSError) else remote.RemoteError(f"upload to {dest} failed: {e}")
                with contextlib.suppress(Exception):
                    dest.store.delete_prefix(dest.key, first=(MANIFEST,))
            finally:
                shutil.rmtree(self.root, ignore_errors=True)
        _agree(self.backend, error, f"the upload to {dest}")
        if error is None:
            _seen[root.url] = sorted(set(_seen.get(root.url, [])) | {self.step})
        return dest


def upload(local: Path, dest, commit: bool = True) -> None:
    """Upload a local checkpoint directory to a remote one: first remove what is there (a crashed upload
    of the same step, or the same step saved again: manifest first), then every file, manifest.json last.
    With commit=False the manifest is not uploaded: the checkpoint stays incomplete (invisible to
    list_steps and resolve) until commit()."""
    dest = RemotePath(dest)
    store = dest.store
    store.delete_prefix(dest.key, first=(MANIFEST,))
    store.upload_dir(local, dest.key, last=(MANIFEST,), skip=() if commit else (MANIFEST,))


def commit(local: Path, dest) -> None:
    """Upload the manifest of an upload(..., commit=False): the remote checkpoint is complete from now on."""
    dest = RemotePath(dest)
    dest.store.upload_file(Path(local) / MANIFEST, dest.join_key(MANIFEST))


def remove(ckpt) -> None:
    """Delete a checkpoint (manifest first, so it is never seen half-removed)."""
    if is_remote(ckpt):
        ckpt = RemotePath(ckpt)
        ckpt.store.delete_prefix(ckpt.key, first=(MANIFEST,))
    else:
        ckpt = Path(ckpt)
        (ckpt / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(ckpt, ignore_errors=True)


def is_checkpoint(path) -> bool:
    """Whether a complete checkpoint (one with a manifest) is at path, local or remote."""
    if is_remote(path):
        path = RemotePath(path)
        return _user_error(lambda: path.store.exists(path.join_key(MANIFEST)))
    return (Path(path) / MANIFEST).is_file()


def download(ckpt, local: Path, require_manifest: bool = True) -> None:
    """Download a remote checkpoint into the local directory (replacing it), manifest.json last.
    require_manifest=False: also an uncommitted one (see upload), e.g. to check it before commit()."""
    ckpt, local = RemotePath(ckpt), Path(local)
    store = ckpt.store
    if require_manifest and not store.exists(ckpt.join_key(MANIFEST)):
        raise UserError(f"checkpoint {ckpt} is incomplete or missing (no {MANIFEST})")
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    got = store.download_dir(ckpt.key, local, last=(MANIFEST,))
    if require_manifest and MANIFEST not in got:    # removed while we read: pruned or replaced meanwhile
        raise UserError(f"checkpoint {ckpt} was removed while it was being downloaded")


def _on_any_process(backend, flag: bool) -> bool:
    """True on every process if `flag` is true on any (collective where there are several)."""
    if backend is not None and getattr(backend, "process_count", 1) > 1:
        return bool(backend.allreduce(np.array([int(flag)], np.uint64))[0])
    return flag


def _agree(backend, error: BaseException | None, what: str) -> None:
    """Every process raises if `what` failed on any, so all take the same path: its own error, or an
    OSError saying it failed on another process (object-store I/O runs on process 0 only)."""
    if _on_any_process(backend, error is not None):
        raise error if error is not None else OSError(f"{what} failed on another process")


def _user_error(fn):
    """Run a remote operation; a network or server failure becomes a one-line UserError."""
    try:
        return fn()
    except remote.RemoteError as e:
        raise UserError(str(e)) from None


_seen: dict[str, list[int]] = {}     # the last listing of each remote root, for list_steps(best_effort=True)


def _remote_steps(root: RemotePath, all_dirs: bool = False):
    store = root.store
    dirs = [d for d in store.list_dirs(root.key) if d.isdigit()]
    complete = [d for d in dirs if store.exists(root.join_key(f"{d}/{MANIFEST}"))]
    steps = sorted(int(d) for d in complete)
    return (steps, [d for d in dirs if d not in complete]) if all_dirs else steps


def list_steps(root: Path, best_effort: bool = False) -> list[int]:
    """Steps of complete checkpoints under root, ascending. For a remote root that cannot be listed now,
    best_effort returns those its last listing (or save) found instead of raising a UserError."""
    if is_remote(root):
        root = RemotePath(root)
        try:
            steps = _user_error(lambda: _remote_steps(root))
        except UserError:
            if best_effort:
                return list(_seen.get(root.url, []))
            raise
        _seen[root.url] = steps
        return steps
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir()
                  if p.name.isdigit() and (p / MANIFEST).is_file())


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove older ones and abandoned temp dirs (on a store: step
    prefixes without a manifest, left by an upload or a removal that was cut short). On a store this is
    best effort: a failure is a warning, and the next prune tries again."""
    if is_remote(root):
        root = RemotePath(root)
        try:
            store = root.store
            steps, abandoned = _remote_steps(root, all_dirs=True)
            doomed = steps[:-keep] if keep > 0 else []
            for step in doomed:
                store.delete_prefix(root.join_key(str(step)), first=(MANIFEST,))
            for d in abandoned:
                store.delete_prefix(root.join_key(d))
            _seen[root.url] = [s for s in steps if s not in doomed]
        except (UserError, OSError) as e:
            log.warning("could not remove old checkpoints in %s (%s); the next checkpoint tries again", root, e)
        return
    root = Path(root)
    steps = list_steps(root)
    for step in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(root / str(step), ignore_errors=True)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint dir, a checkpoints/ dir or a run dir -> the checkpoint directory to read (on a store:
    a checkpoint prefix, a checkpoints prefix, or a prefix holding checkpoints/ -> a RemotePath)."""
    if is_remote(path):
        return _user_error(lambda: _resolve_remote(RemotePath(path)))
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    for root in (p / "checkpoints", p):
        steps = list_steps(root)
        if steps:
            return root / str(steps[-1])
    elsewhere = _recorded_checkpoint_dir(p)
    if elsewhere is not None:
        return resolve(elsewhere)
    raise UserError(f"{path} is not a trichip checkpoint (no {MANIFEST}), nor a run or checkpoints "
                    f"directory holding one")


def _recorded_checkpoint_dir(run_dir: Path):
    """A run dir whose run kept its checkpoints elsewhere (trainer.checkpoint_dir, from its resolved config
    in .hydra/config.yaml): that place, if it is an object store or an absolute path; else None."""
    try:
        import yaml
        value = (yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {})["trainer"]["checkpoint_dir"]
    except Exception:       # no such file, not YAML, no such key
        return None
    if isinstance(value, str) and (is_remote(value) or os.path.isabs(value)) and Path(value) != run_dir:
        return value
    return None


def _resolve_remote(p: RemotePath) -> RemotePath:
    if p.store.exists(p.join_key(MANIFEST)):
        return p
    for root in (p / "checkpoints", p):
        steps = list_steps(root)
        if steps:
            return root / str(steps[-1])
    raise UserError(f"{p} is not a trichip checkpoint (no {MANIFEST}), nor a run or checkpoints "
                    f"prefix holding one")


def read_manifest(ckpt: Path, name=None) -> dict:
    """The manifest of a checkpoint (local, or remote: read without downloading anything else).
    `name`: how errors call the checkpoint (default: ckpt)."""
    try:
        if is_remote(ckpt):
            ckpt = RemotePath(ckpt)
            manifest = json.loads(ckpt.store.read_bytes(ckpt.join_key(MANIFEST)))
        else:
            manifest = json.loads((Path(ckpt) / MANIFEST).read_text())
    except (OSError, ValueError, UserError) as e:
        raise UserError(f"checkpoint {name or ckpt}: cannot read {MANIFEST} ({e})") from None
    ckpt = name or ckpt
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {ckpt} has format version {manifest.get('format_version')}; "
                        f"this trichip reads version {FORMAT_VERSION}")
    return manifest


def load(ckpt: Path, backend, cache=None) -> dict:
    """Restore a checkpoint into the backend (collective), verifying every tensor's digest against the
    manifest. Returns the manifest. A remote checkpoint is downloaded into `cache` first (see fetch)."""
    if is_remote(ckpt):
        with fetch(ckpt, cache, backend) as local:
            return _load(local, backend, RemotePath(ckpt))
    return _load(Path(ckpt), backend, ckpt)


def _load(local: Path, backend, name) -> dict:
    manifest = read_manifest(local, name)
    found = backend.load(str(local / "state"), manifest["tensors"])
    for tensor, digest in found.items():
        if manifest["tensors"][tensor]["digest"] != digest:
            raise UserError(f"checkpoint {name}: tensor {tensor} does not match its manifest digest; "
                            f"the checkpoint is damaged")
    return manifest


@contextlib.contextmanager
def fetch(ckpt, cache=None, backend=None):
    """A local directory holding checkpoint `ckpt`: the directory itself, or for a remote checkpoint a
    copy downloaded into cache/<step> (by default a temporary directory), removed afterwards.

    With a backend it is collective: process 0 downloads, every process gets the same directory (so
    `cache` must be on a filesystem they share, like the run dir), and all raise if the download failed."""
    if not is_remote(ckpt):
        yield Path(ckpt)
        return
    ckpt = RemotePath(ckpt)
    lead = backend is None or backend.process_index == 0
    tmp = None
    if cache is None:
        if backend is not None and backend.process_count > 1:
            raise ValueError("a collective fetch needs a shared cache directory")
        tmp = cache = tempfile.mkdtemp(prefix="trichip-fetch-")
    local = Path(cache) / (ckpt.name or "checkpoint")
    error = None
    if lead:
        try:
            download(ckpt, local)
        except Exception as e:
            error = UserError(f"cannot download {ckpt}: {e}") if isinstance(e, remote.RemoteError) else e
            shutil.rmtree(local, ignore_errors=True)
    try:
        _agree(backend, error, f"the download of {ckpt}")
        yield local
        if backend is not None:
            backend.barrier(f"fetched-{ckpt.name}")     # every process has read it
    finally:
        if lead:
            shutil.rmtree(local, ignore_errors=True)
            with contextlib.suppress(OSError):
                Path(cache).rmdir()                     # only when empty
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
