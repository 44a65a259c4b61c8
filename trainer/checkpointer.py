"""The one authority over a run's checkpoints: what the run resumes from, when it saves, what it prunes.

The rules it enforces (README, "What trichip guarantees"):
- It holds the locks before anything is listed or read: the run directory's (trainer.safety.RunLock) and the
  checkpoint location's (an flock beside an external checkpoint_dir on a disk; on every external location an
  owner record, `owner.json`, naming the run that writes there, created atomically).
- Only a checkpoint proven damaged (trainer.checkpoint: CheckpointDamaged) is skipped; one that cannot be read
  or reached (StorageError) stops the run. Falling back never goes past the newest good checkpoint to a fresh
  init unless trainer.fresh_if_damaged says so.
- A checkpoint replaces an older one of the same step only when that one was proven damaged, and the old copy
  is removed only after the new one is complete.
- Pruning keeps the newest `keep` good checkpoints of this run's lineage (manifests carrying its run id or the
  id of a run it resumed from, or none: written before lineage was recorded) up to the newest it wrote; others
  are never touched.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from hal.base import CheckpointDamaged, CheckpointSaveError, StorageError, UserError, WrongModelError, first_line
from trainer import checkpoint
from trainer.safety import RunLock
from trainer.storage import LocalDir, Location, recover_aside, storage_errors

log = logging.getLogger("trichip")
OWNER = "owner.json"
STAGING = ".staging"          # run-dir scratch for checkpoints on object stores
REMOTE_CACHE = ".remote-cache"
SAVE_ERRORS = (OSError, ValueError, RuntimeError, UserError)   # orbax/tensorstore report I/O errors as ValueError


class Checkpointer:
    """A run's checkpoints at `root`, for `run_id` (run.json's). Collective methods are called by every
    process at the same step; process 0 (`lead`) alone touches locks, owner records and pruning."""

    def __init__(self, root: Location, run_dir: Path, run_id: str, backend, *, keep: int, async_save: bool,
                 on_save_error: str = "stop", config_yaml: str = ""):
        self.root, self.run_dir, self.run_id, self.backend = root, Path(run_dir), run_id, backend
        self.keep, self.async_save, self.on_save_error, self.config_yaml = keep, async_save, on_save_error, config_yaml
        self.lead = backend.process_index == 0
        self.pending: checkpoint.PendingSave | None = None      # being written
        self.uploading: checkpoint.PendingSave | None = None    # committed, being uploaded to a store
        self.damaged: set[int] = set()
        self.written: list[int] = []           # committed by this process, in order
        self.failures: list[str] = []
        self.lineage = [run_id]                # this run's id, then the ids of the runs it descends from
        self.resumed_from: int | None = None   # the checkpoint the run started from, when it did
        self._locks: list[RunLock] = []

    # -- locks -------------------------------------------------------------------------------------
    def acquire(self) -> "Checkpointer":
        """Lock the run dir and the checkpoint location, and claim an external location for this run."""
        if not self.lead:
            return self
        self._locks.append(RunLock(self.run_dir).acquire())
        if self._external:
            if isinstance(self.root, LocalDir):
                self._locks.append(RunLock(self.root.path).acquire())
            self._claim()
        if isinstance(self.root, LocalDir):
            recover_aside(self.root.path)
        return self

    @property
    def _external(self) -> bool:
        return not (isinstance(self.root, LocalDir) and self.root.path == self.run_dir / "checkpoints")

    def _claim(self) -> None:
        record = json.dumps({"run_id": self.run_id, "run_dir": str(self.run_dir.resolve()),
                             "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()
        with storage_errors("claim", self.root):
            if self.root.create(OWNER, record):
                return
            owner = _json_or_empty(self.root.read_bytes(OWNER))
        if owner.get("run_id") != self.run_id:
            raise UserError(f"checkpoint_dir {self.root} belongs to another run ({owner.get('run_dir', '?')}, run id "
                            f"{owner.get('run_id', '?')}); give this run its own trainer.checkpoint_dir, or start "
                            f"from those checkpoints with trainer.init_from={self.root}")

    def release(self) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._locks.clear()

    # -- what the run starts from --------------------------------------------------------------------
    def candidates(self) -> list[int]:
        """Steps to try, newest first: complete checkpoints, and on a disk step directories without a manifest
        (damaged: they are tried, so the damage is reported, not skipped silently)."""
        complete, unfinished = checkpoint.scan(self.root)
        if self.root.is_remote:
            unfinished = []
        return sorted(complete + unfinished, reverse=True)

    def restore(self, check_model, strict: bool, fresh_if_damaged: bool) -> tuple[int, dict | None, str]:
        """Load the newest good checkpoint: (its step, manifest, where) or (-1, None, "") when there is none.
        Proven damage is skipped with a warning (strict: raised); anything else is raised."""
        steps = self.candidates()
        for step in steps:
            ckpt = self.root / str(step)
            try:
                manifest = checkpoint.read_manifest(ckpt)
                check_model(ckpt, manifest)          # another model: the user's to fix, never damage
                try:
                    checkpoint.load(ckpt, self.backend, cache=self.run_dir / REMOTE_CACHE, manifest=manifest)
                except WrongModelError as e:        # the model matches, so tensors missing from it are damage
                    raise CheckpointDamaged(str(e)) from None
                self.adopt(manifest)
                self.resumed_from = manifest["step"]
                return manifest["step"], manifest, str(ckpt)
            except (WrongModelError, StorageError):
                raise
            except CheckpointDamaged as e:
                if strict:
                    raise
                self.damaged.add(step)
                log.warning("%s — falling back to the previous checkpoint", e)
        if steps and not fresh_if_damaged:
            raise CheckpointDamaged(f"every checkpoint in {self.root} is damaged ({', '.join(map(str, steps))}); "
                                    f"nothing was changed. Set trainer.fresh_if_damaged=true to start this run "
                                    f"from the reference init anyway")
        if steps:
            log.warning("every checkpoint in %s is damaged: starting from the reference init "
                        "(trainer.fresh_if_damaged=true)", self.root)
        return -1, None, ""

    def adopt(self, manifest: dict) -> None:
        """This run continues the one that wrote `manifest`: that run's checkpoints are its lineage too."""
        lineage = manifest.get("lineage") or {}
        for run_id in [lineage.get("run_id"), *lineage.get("ancestors", [])]:
            if run_id and run_id not in self.lineage:
                self.lineage.append(run_id)

    # -- saving ---------------------------------------------------------------------------------------
    def save(self, step: int, meta: dict, wait: bool = False) -> None:
        """Start checkpoint `step` (committing the previous pending one first); with `wait`, or without
        async saves, commit it now. A failure follows trainer.on_save_error."""
        self.commit()
        try:
            self.pending = checkpoint.PendingSave(
                self.root, step, self.backend, dict(meta, lineage=self.lineage_record()), self.config_yaml,
                staging=self.run_dir / STAGING, background=self.async_save and not wait, replace=step in self.damaged)
        except SAVE_ERRORS as e:
            return self._failed(step, e)
        if wait or not self.async_save:
            self.commit()

    def lineage_record(self) -> dict:
        return {"run_id": self.run_id, "ancestors": self.lineage[1:]}

    def ready(self) -> bool:
        """Whether this process's background write and upload have ended (commit() would not wait)."""
        return (self.pending is None or self.pending.done()) and (self.uploading is None or self.uploading.uploaded())

    def commit(self) -> None:
        """Finish the pending save (every process at the same step): manifest, publication, pruning. On a store
        the upload runs in the background; the one before it is waited for first."""
        self._finish_upload()
        p, self.pending = self.pending, None
        if p is None:
            return
        try:
            where = p.finish(upload_in_background=True)
        except SAVE_ERRORS as e:
            return self._failed(p.step, e)
        if self.root.is_remote:
            self.uploading = p
        else:
            self._committed(p.step, where)

    def _finish_upload(self) -> None:
        p, self.uploading = self.uploading, None
        if p is None:
            return
        try:
            where = p.finish_upload()
        except SAVE_ERRORS as e:
            return self._failed(p.step, e)
        self._committed(p.step, where)

    def _committed(self, step: int, where) -> None:
        self.written.append(step)
        self.damaged.discard(step)
        log.info("checkpoint %s", where)
        self.prune()

    def _failed(self, step: int, e: BaseException) -> None:
        msg = (f"checkpoint at step {step} failed ({io_reason(e)}); earlier checkpoints are intact "
               f"(latest: {self.latest() or 'none'})")
        self.failures.append(msg)
        if self.on_save_error == "continue":
            log.error("%s; training goes on (trainer.on_save_error=continue)", msg)
            return
        raise CheckpointSaveError(msg + "; free space or set trainer.on_save_error=continue") from None

    def latest(self):
        """The newest checkpoint this run can resume from, as far as this run knows."""
        if self.written:
            return self.written[-1]
        try:
            good = [s for s in checkpoint.list_steps(self.root) if s not in self.damaged]
        except UserError:          # the store cannot be listed now: what the run started from is intact
            return self.resumed_from
        return good[-1] if good else self.resumed_from

    def prune(self) -> None:
        """Keep the newest `keep` good checkpoints of this lineage up to the newest written; remove older ones
        and abandoned temp directories. Best effort: a failure is a warning, the next commit tries again."""
        if not self.lead or not self.written:
            return
        try:
            checkpoint.prune(self.root, self.keep, upto=self.written[-1], skip=self.damaged, lineage=self.lineage,
                             busy=[self.pending.step] if self.pending is not None else [])
        except (UserError, OSError) as e:
            log.warning("could not remove old checkpoints in %s (%s); the next checkpoint tries again",
                        self.root, first_line(e))

    def close(self) -> None:
        """Commit what is pending and wait for its upload (the end of a run, a stop): every process."""
        self.commit()
        self._finish_upload()

    def summary(self) -> dict:
        return {"checkpoints_written": list(self.written), "checkpoint_failures": list(self.failures),
                "latest_checkpoint": self.latest()}


def _json_or_empty(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def io_reason(e: BaseException) -> str:
    """The OS error behind a failed write, also when tensorstore reports it inside a ValueError."""
    import re
    if getattr(e, "strerror", None):
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    return os.strerror(int(code.group(1))) if code else first_line(e, 160)
