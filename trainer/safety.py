"""Run safety: one run per run directory and checkpoint location (a lock a crash cannot leave stuck) and
preemption signals.

SIGTERM / SIGINT (the preemption notice of TPU VMs, spot instances, SLURM) ask the loop to stop: it
finishes the current step, writes a checkpoint and exits 0. A second signal exits at once; checkpoints
are renamed into place only when complete, so that never damages the last one.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path

from hal.base import StorageError, UserError

LOCK_FILE = ".lock"


class RunLock:
    """An flock on <dir>/.lock, held for the life of the process. The kernel drops it when the process
    dies, however it dies, so a crashed run never blocks the next one. Re-entrant within a process: the
    launcher takes the run dir's lock before Hydra writes into it, and the run takes it again."""

    _held: dict[Path, list] = {}           # resolved path -> [fd, holders] of this process

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_FILE
        self.key = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UserError(f"{self.path.parent} is a file; choose a directory") from None
        except OSError as e:
            raise StorageError(f"cannot create {self.path.parent}: {e.strerror}") from None
        key = self.path.resolve()
        if key in self._held:
            self._held[key][1] += 1
            self.key = key
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot lock {self.path.parent}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another run (pid {holder.get('pid', '?')} "
                            f"on {holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it to end "
                            f"or choose another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        self._held[key] = [fd, 1]
        self.key = key
        return self

    def release(self) -> None:
        if self.key is None:
            return
        entry = self._held[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])
            del self._held[self.key]
        self.key = None


class StopRequest:
    """Turns the first SIGTERM/SIGINT into a flag the loop reads between steps; the second exits now."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        # With `ulimit -f`, a write past the limit raises SIGXFSZ, which kills the process by default;
        # ignored, the write fails with EFBIG and the save-failure policy decides.
        self._previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os.write(2, f"second {signal.Signals(signum).name}: exiting now\n".encode())
            os._exit(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
