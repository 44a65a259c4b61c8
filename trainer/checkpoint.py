"""The checkpoint format and its primitives: one format for every backend.

    <root>/<step>/manifest.json   format version, step, data cursor, RNG, model spec, who wrote it, the run
                                  lineage, and every tensor's shape, dtype and digest
    <root>/<step>/config.yaml     the resolved run config
    <root>/<step>/state/          the tensors (orbax-checkpoint; hal.store says which layout)

A checkpoint is assembled in a local `.tmp-<step>/` directory (under the root on a disk, under the run's
staging directory for an object store) and published whole by the location layer (trainer.storage): a rename
on a disk, an upload with the manifest last on a store. It is complete iff its manifest is there.

Every function takes a local path, an s3:// or gs:// URL, or a trainer.storage.Location. The policy (which
checkpoint a run resumes from, when to save, what to prune) is trainer.checkpointer's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from hal import layout
from hal.base import CheckpointDamaged, Snapshot, UserError, first_line
from trainer.storage import MANIFEST, LocalDir, Location, StoreDir, is_remote, location, storage_errors

log = logging.getLogger("trichip")

FORMAT_VERSION = layout.FORMAT_VERSION
__all__ = ["FORMAT_VERSION", "MANIFEST", "PendingSave", "checkpoint_root", "fetch", "is_checkpoint", "list_steps",
           "load", "location", "prune", "read_manifest", "remove", "resolve", "save", "scan", "is_remote"]


def public(loc: Location):
    """A Location as callers outside this module see it: a Path on a disk, the StoreDir on a store."""
    return loc.path if isinstance(loc, LocalDir) else loc


def checkpoint_root(checkpoint_dir, run_dir) -> Location:
    """Where a run keeps its checkpoints: trainer.checkpoint_dir (a directory, or an s3:// or gs:// prefix,
    whose bucket and credentials are checked now, before any compute); by default run_dir/checkpoints."""
    if checkpoint_dir in (None, ""):
        return LocalDir(Path(run_dir) / "checkpoints")
    root = location(checkpoint_dir)
    if isinstance(root, StoreDir):
        root.store        # noqa: B018  (made and checked now)
    return root


def save(root, step: int, backend, meta: dict, config_yaml: str = "", staging=None, replace: bool = False):
    """Write checkpoint `step` under root, blocking; returns where it is (collective: every process calls it)."""
    return PendingSave(root, step, backend, meta, config_yaml, staging, background=False, replace=replace).finish()


class PendingSave:
    """One checkpoint on its way to storage. background=True (trainer.async_save): the state is copied now
    (the only part that blocks training) and written by a thread while training goes on. `finish()`, called
    on every process at the same step, adds the digests up, writes the manifest and publishes the
    checkpoint. Until then it is a .tmp-<step> directory that a crash leaves behind and pruning removes.

    A store root needs `staging`, a local directory every process can write (the run dir's .staging/).
    `replace`: an existing checkpoint of the same step may be replaced (it was proven damaged)."""

    def __init__(self, root, step: int, backend, meta: dict, config_yaml: str = "", staging=None,
                 background: bool = True, replace: bool = False):
        self.step, self.backend, self.meta, self.config_yaml = step, backend, meta, config_yaml
        self.dest, self.replace = location(root) / str(step), replace
        if self.dest.is_remote and staging is None:
            raise ValueError(f"saving to {root} needs a local staging directory")
        local_root = Path(staging) if self.dest.is_remote else Path(str(root))
        self.tmp = local_root / f".tmp-{step}"
        self.lead = backend.process_index == 0
        self.written, self.error, self._thread = None, None, None
        if self.lead:
            local_root.mkdir(parents=True, exist_ok=True)
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
        self.held = write.held if isinstance(write, Snapshot) else None     # device copies the write reads
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
            error = first_line(e, 160)    # the message only: the exception's frames would keep the partial copy
        if _on_any_process(self.backend, error is not None):      # every process takes the same path
            log.warning("checkpoint %d: no room for a background copy of the state (%s); this save blocks "
                        "training (trainer.async_save=false avoids the attempt)", self.step,
                        error or "on another process")
            return None
        return write

    def _write(self, write) -> None:
        try:
            self.written = write(str(self.tmp / "state"))     # a hal.Snapshot, or a plain write function
        except BaseException as e:   # noqa: BLE001  (handed to finish(), on the training thread)
            self.error = e

    def done(self) -> bool:
        """The background write has ended (well or not) on this process."""
        return self._thread is None or not self._thread.is_alive()

    def _cleanup(self) -> None:
        if self.lead:
            _remove_tree(self.tmp)
            if self.dest.is_remote:
                with contextlib.suppress(OSError):
                    self.tmp.parent.rmdir()          # the staging directory, once empty

    def finish(self, upload_in_background: bool = False):
        """Wait for the write, then commit (collective: every process, same step). Raises the write's or the
        publication's error on every process if it failed on any (the temp directory is removed; whatever
        was at the destination before is intact). Returns where the checkpoint is (see `public`).

        A store destination is uploaded by process 0; with `upload_in_background` by a thread, so training
        goes on: the checkpoint exists on the store once `finish_upload()` (collective) has returned."""
        if self._thread is not None:
            self._thread.join()
        self.held = None          # the state's copies are written: free them before the next save makes its own
        backend, self._upload = self.backend, None
        try:
            _agree(backend, self.error, f"the write of checkpoint {self.step}")
            tensors = backend.combine(self.written)
            error = None
            if self.lead:
                try:
                    self._commit(tensors, upload_in_background)
                except Exception as e:      # noqa: BLE001  (agreed on below, then raised)
                    error = e
            _agree(backend, error, f"the commit of checkpoint {self.step}")
        except BaseException:
            self._cleanup()
            raise
        if self._upload is None:
            self._cleanup()
        backend.barrier(f"checkpoint-{self.step}-done")
        return public(self.dest)

    def _commit(self, tensors: dict, upload_in_background: bool) -> None:
        """Process 0: the manifest (fsync'd), then the publication that makes the checkpoint exist."""
        manifest = dict(self.meta, format_version=FORMAT_VERSION, step=self.step, tensors=tensors)
        (self.tmp / "config.yaml").write_text(self.config_yaml)
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if self.dest.is_remote and upload_in_background:
            self._upload = threading.Thread(target=self._publish, name=f"upload-{self.step}", daemon=True)
            self._upload.start()
        else:
            self.dest.publish(self.tmp, replace=self.replace)

    def _publish(self) -> None:
        try:
            self.dest.publish(self.tmp, replace=self.replace)
        except BaseException as e:   # noqa: BLE001  (handed to finish_upload(), on the training thread)
            self.error = e

    def uploaded(self) -> bool:
        """The background upload has ended (well or not) on this process (always, where it uploads nothing)."""
        upload = getattr(self, "_upload", None)
        return upload is None or not upload.is_alive()

    def finish_upload(self):
        """Wait for the background upload (collective); raises its error on every process if it failed."""
        upload = getattr(self, "_upload", None)
        try:
            if upload is not None:
                upload.join()
            _agree(self.backend, self.error if upload is not None else None, f"the upload to {self.dest}")
        finally:
            self._upload = None
            self._cleanup()
        return public(self.dest)


def _remove_tree(path: Path, wait: float = 2.0) -> None:
    """Remove a temporary checkpoint directory. After a failed write the store's own threads may still be
    finishing writes they had started (orbax raises at the first failure), and a file they create while the
    tree is removed leaves it behind: remove again until it is gone, for up to `wait` seconds. What still
    remains then is removed by pruning, as a crash's would be."""
    deadline = time.monotonic() + wait
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.05)


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


def upload(local: Path, dest, commit: bool = True) -> None:
    """Upload a local checkpoint directory to a store prefix (see StoreDir.upload; commit=False leaves the
    manifest out, so the copy is invisible to resume until `commit`)."""
    StoreDir(str(dest)).upload(Path(local), commit=commit)


def commit(local: Path, dest) -> None:
    """Upload the manifest of an upload(..., commit=False): the remote checkpoint is complete from now on."""
    StoreDir(str(dest)).commit(Path(local))


def download(ckpt, local: Path, require_manifest: bool = True) -> None:
    """Download a remote checkpoint into the local directory (replacing it), manifest.json last."""
    try:
        location(ckpt).download(Path(local), require_manifest=require_manifest)
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {e.strerror}") from None


def remove(ckpt) -> None:
    """Delete a checkpoint (manifest first, so it is never seen half-removed)."""
    location(ckpt).remove()


def is_checkpoint(path) -> bool:
    """Whether a complete checkpoint (one with a manifest) is at path, local or remote."""
    loc = location(path)
    with storage_errors("read", loc):
        return loc.exists(MANIFEST)


def scan(root) -> tuple[list[int], list[int]]:
    """(steps with a manifest, steps without one) under root, ascending. On a disk a step directory without a
    manifest was damaged (a checkpoint is renamed into place only after its manifest is written); on a store
    it is an upload that did not finish, invisible by the commit rule."""
    root = location(root)
    with storage_errors("list", root):
        steps = sorted(int(d) for d in root.list_dirs() if d.isdigit())
        complete = [s for s in steps if (root / str(s)).exists(MANIFEST)]
    return complete, [s for s in steps if s not in complete]


def list_steps(root) -> list[int]:
    """Steps of complete checkpoints under root, ascending."""
    return scan(root)[0]


def prune(root, keep: int, upto: int | None = None, skip=(), lineage=None, busy=()) -> list[int]:
    """Keep the newest `keep` complete checkpoints with step <= upto, not in `skip` (known damaged) and, given
    `lineage` (run ids), whose manifests carry one of them (or none); remove older ones of those, and abandoned temp
    directories (on a store: step prefixes without a manifest), except the `busy` ones being written.
    Checkpoints outside that set are never touched. Returns the steps removed."""
    loc = location(root)
    with storage_errors("prune", loc):
        complete, unfinished = scan(loc)
        ours = [s for s in complete if (upto is None or s <= upto) and s not in skip
                and (lineage is None or _lineage(loc / str(s)) in (None, *lineage))]
        doomed = ours[:-keep] if keep > 0 else []
        for step in doomed:
            (loc / str(step)).remove()
        if isinstance(loc, LocalDir):
            for p in loc.path.glob(".tmp-*"):
                if p.name not in {f".tmp-{b}" for b in busy}:
                    LocalDir(p).remove()
        else:
            for step in unfinished:
                if step not in busy:
                    (loc / str(step)).remove()
    return doomed


def _lineage(ckpt: Location):
    """The run id a checkpoint's manifest carries (None: written before lineage was recorded); a damaged
    manifest belongs to no lineage."""
    try:
        return (read_manifest(ckpt).get("lineage") or {}).get("run_id")
    except CheckpointDamaged:
        return "?"


def resolve(path):
    """A checkpoint dir, a checkpoints/ dir or a run dir (or such a store prefix) -> the checkpoint to read:
    a Path on a disk, a StoreDir on a store."""
    loc = location(path)
    with storage_errors("read", loc):
        if loc.exists(MANIFEST):
            return public(loc)
        for root in (loc / "checkpoints", loc):
            steps = list_steps(root)
            if steps:
                return public(root / str(steps[-1]))
    elsewhere = None if loc.is_remote else _recorded_checkpoint_dir(Path(str(loc)))
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


def read_manifest(ckpt, name=None) -> dict:
    """The manifest of a checkpoint (local, or remote: read without downloading anything else). A manifest
    that is missing, not JSON or not the object trichip writes is CheckpointDamaged; one that cannot be read
    is StorageError. `name`: how errors call the checkpoint (default: ckpt)."""
    loc = location(ckpt)
    name = name or ckpt
    try:
        with storage_errors("read", loc):
            raw = loc.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise CheckpointDamaged(f"checkpoint {name} has no {MANIFEST}") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise CheckpointDamaged(f"checkpoint {name}: {MANIFEST} is not JSON ({first_line(e, 120)})") from None
    layout.check_manifest(manifest, name)
    return manifest


def load(ckpt, backend, cache=None, manifest: dict | None = None) -> dict:
    """Restore a checkpoint into the backend (collective), verifying every tensor's shape, dtype and digest
    against the manifest. Returns the manifest. A remote checkpoint is downloaded into `cache` first.
    Raises CheckpointDamaged for proven damage, StorageError when it cannot be read. `manifest`: the one the
    caller already read (read_manifest), so it is not read twice."""
    loc = location(ckpt)
    if manifest is None:
        manifest = read_manifest(loc, ckpt)     # before any download: a damaged manifest costs nothing
    with fetch(loc, cache, backend) as local:
        _load(local, backend, ckpt, manifest)
    return manifest


def _load(local: Path, backend, name, manifest: dict) -> None:
    """backend.load checks the manifest against the model (WrongModelError), reads (hal.store sorts read errors
    into CheckpointDamaged and StorageError) and verifies every tensor (hal.layout.verify)."""
    backend.load(str(local / "state"), manifest["tensors"], name=str(name))


@contextlib.contextmanager
def fetch(ckpt, cache=None, backend=None):
    """A local directory holding checkpoint `ckpt`: the directory itself, or for a remote checkpoint a
    copy downloaded into cache/<step> (by default a temporary directory), removed afterwards.

    With a backend it is collective: process 0 downloads, every process gets the same directory (so
    `cache` must be on a filesystem they share, like the run dir), and all raise if the download failed."""
    loc = location(ckpt)
    if not loc.is_remote:
        yield Path(str(loc))
        return
    lead = backend is None or backend.process_index == 0
    tmp = None
    if cache is None:
        if backend is not None and backend.process_count > 1:
            raise ValueError("a collective fetch needs a shared cache directory")
        tmp = cache = tempfile.mkdtemp(prefix="trichip-fetch-")
    local = Path(cache) / (loc.name or "checkpoint")
    error = None
    if lead:
        try:
            with storage_errors("download", loc):
                loc.download(local)
        except FileNotFoundError as e:
            error = CheckpointDamaged(f"checkpoint {e.strerror}")
        except Exception as e:       # noqa: BLE001  (agreed on below, then raised)
            error = e
        if error is not None:
            shutil.rmtree(local, ignore_errors=True)
    try:
        _agree(backend, error, f"the download of {loc}")
        yield local
        if backend is not None:
            backend.barrier(f"fetched-{loc.name}")     # every process has read it
    finally:
        if lead:
            shutil.rmtree(local, ignore_errors=True)
            with contextlib.suppress(OSError):
                Path(cache).rmdir()                     # only when empty
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
