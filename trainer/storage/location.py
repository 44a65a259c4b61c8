"""One location layer for local directories and object-store prefixes.

A `Location` is a directory on a local disk (`LocalDir`) or a key prefix in a bucket (`StoreDir`,
s3://bucket/prefix or gs://bucket/prefix). Both offer the same few operations, so the checkpoint rules are
written once (trainer.checkpoint, trainer.checkpointer):

- `publish(local, replace=...)` makes a finished local directory appear here whole: a rename on a disk; on a
  store, an upload with `manifest.json` last, since a store has no rename (a checkpoint there is complete iff
  its manifest exists). What was there before is removed only after the new copy is complete, and only when
  the caller says it may be replaced.
- `remove()` deletes `manifest.json` first, so nothing is ever seen half-removed as complete.
- `create(name, data)` writes a small file only if none exists (O_EXCL on a disk, a conditional put on a
  store): the lock and ownership records are built on it.

Errors: a file that is not there is FileNotFoundError; anything else that stops a read or write (permissions,
a full disk, a store outage after the retries) is models.errors.StorageError or an OSError, never taken for
a missing or damaged file.
"""
from __future__ import annotations

import abc
import contextlib
import errno
import os
import shutil
from pathlib import Path

from models.errors import StorageError, UserError, first_line
from trainer.storage import objectstore
from trainer.storage.objectstore import SCHEMES, RemoteError

MANIFEST = "manifest.json"


def is_remote(path) -> bool:
    """True for a StoreDir and for a string like s3://bucket/prefix or gs://bucket/prefix."""
    if isinstance(path, StoreDir):
        return True
    return isinstance(path, str) and path.split("://", 1)[0] in SCHEMES and "://" in path


def location(path) -> "Location":
    """A local path or an object-store URL as a Location; any other scheme:// is a one-line error."""
    if isinstance(path, Location):
        return path
    text = str(path)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise UserError(f"{text}: unsupported scheme {scheme}://; use a local path, "
                            f"{' or '.join(s + '://BUCKET/PREFIX' for s in SCHEMES)}")
        return StoreDir(text)
    return LocalDir(text)


class Location(abc.ABC):
    """A directory (local or on a store) and the operations checkpoints need."""

    is_remote = False

    @property
    @abc.abstractmethod
    def name(self) -> str: ...

    @abc.abstractmethod
    def __truediv__(self, name) -> "Location": ...

    @abc.abstractmethod
    def list_dirs(self) -> list[str]:
        """Names of the immediate subdirectories ([] when this location does not exist)."""

    @abc.abstractmethod
    def exists(self, rel: str) -> bool:
        """Whether the file rel (relative to this location) exists."""

    @abc.abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The file's bytes; FileNotFoundError when it is not there."""

    @abc.abstractmethod
    def create(self, rel: str, data: bytes) -> bool:
        """Write the file only if it does not exist (atomically); False if it did."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Delete this directory, manifest.json first."""

    @abc.abstractmethod
    def publish(self, local: Path, replace: bool = False) -> None:
        """Make the finished local directory `local` appear at this location, complete or not at all.
        An existing directory here is kept until the new one is complete, then removed; without
        `replace` an existing complete one is an error."""

    @abc.abstractmethod
    def download(self, local: Path, require_manifest: bool = True) -> None:
        """Copy this directory into `local` (replacing it), manifest.json last."""

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __fspath__(self) -> str:
        if self.is_remote:
            raise TypeError(f"{self.url} is not a local path")
        return self.url


def _storage_error(e: OSError, what: str, path) -> StorageError:
    reason = e.strerror or first_line(e)
    return StorageError(f"cannot {what} {path}: {reason} (nothing was changed; fix the storage and run again)")


class LocalDir(Location):
    """A directory on a local (or network-mounted) filesystem."""

    def __init__(self, path):
        self.path = Path(path)

    @property
    def url(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def parent(self) -> "LocalDir":
        return LocalDir(self.path.parent)

    def __truediv__(self, name) -> "LocalDir":
        return LocalDir(self.path / str(name))

    def list_dirs(self) -> list[str]:
        try:
            return sorted(p.name for p in self.path.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise _storage_error(e, "list", self.path) from None

    def exists(self, rel: str) -> bool:
        try:
            os.stat(self.path / rel)
            return True
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return False
        except OSError as e:
            raise _storage_error(e, "read", self.path / rel) from None

    def read_bytes(self, rel: str) -> bytes:
        try:
            return (self.path / rel).read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise _storage_error(e, "read", self.path / rel) from None

    def create(self, rel: str, data: bytes) -> bool:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def remove(self) -> None:
        (self.path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)

    def publish(self, local: Path, replace: bool = False) -> None:
        """A rename. An existing directory is renamed aside first (`.old-<name>`), removed once the new one
        is in place; a crash in between leaves the old one at `.old-<name>`, which `recover_aside` puts back."""
        final, aside = self.path, self.path.with_name(f".old-{self.path.name}")
        if final.exists():
            if not replace and (final / MANIFEST).exists():
                raise FileExistsError(errno.EEXIST, f"{final} exists", str(final))
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(local, final)
        _fsync_dir(final.parent)
        shutil.rmtree(aside, ignore_errors=True)

    def download(self, local: Path, require_manifest: bool = True) -> None:
        if Path(local).resolve() != self.path.resolve():
            shutil.rmtree(local, ignore_errors=True)
            shutil.copytree(self.path, local)


def recover_aside(root: Path) -> None:
    """Put back a checkpoint renamed aside by a publish that a crash cut short (its replacement never
    arrived); drop the aside copy where the replacement did arrive."""
    root = Path(root)
    if not root.is_dir():
        return
    for aside in root.glob(".old-*"):
        final = root / aside.name[len(".old-"):]
        if (final / MANIFEST).is_file():
            shutil.rmtree(aside, ignore_errors=True)
        elif not final.exists():
            os.rename(aside, final)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreDir(Location):
    """scheme://bucket/prefix: a key prefix in one bucket. `/` joins as for pathlib; `.store` is the bucket's
    client (made and checked once per process)."""

    is_remote = True

    def __init__(self, url):
        url = str(url)
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SCHEMES:
            raise UserError(f"{url} is not an object-store URL ({', '.join(s + '://' for s in SCHEMES)})")
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise UserError(f"{url} names no bucket ({scheme}://BUCKET/PREFIX)")
        self.scheme, self.bucket = scheme, bucket
        self.key = "/".join(p for p in key.split("/") if p)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}" + (f"/{self.key}" if self.key else "")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else ""

    @property
    def parent(self) -> "StoreDir":
        return StoreDir(f"{self.scheme}://{self.bucket}/{self.key.rpartition('/')[0]}")

    def __truediv__(self, name) -> "StoreDir":
        return StoreDir(f"{self.url}/{name}")

    @property
    def store(self) -> objectstore.Store:
        return objectstore.open_store(self.scheme, self.bucket)

    def join_key(self, rel: str) -> str:
        return f"{self.key}/{rel}" if self.key else rel

    def list_dirs(self) -> list[str]:
        return self.store.list_dirs(self.key)

    def exists(self, rel: str) -> bool:
        return self.store.exists(self.join_key(rel))

    def read_bytes(self, rel: str) -> bytes:
        store = self.store
        if not store.exists(self.join_key(rel)):
            raise FileNotFoundError(errno.ENOENT, "no such object", f"{self.url}/{rel}")
        return store.read_bytes(self.join_key(rel))

    def create(self, rel: str, data: bytes) -> bool:
        return self.store.create(self.join_key(rel), data)

    def remove(self) -> None:
        self.store.delete_prefix(self.key, first=(MANIFEST,))

    def publish(self, local: Path, replace: bool = False) -> None:
        """Upload, manifest last. A store cannot rename, so a complete checkpoint already here is only
        replaced when the caller says it may be (a damaged one); it is then removed first."""
        if self.store.exists(self.join_key(MANIFEST)) and not replace:
            raise FileExistsError(errno.EEXIST, f"{self.url} exists", self.url)
        self.upload(local)

    def upload(self, local: Path, commit: bool = True) -> None:
        """Upload a local directory here (replacing what is here, manifest first); commit=False leaves its
        manifest out, so the copy stays incomplete until `commit(local)`."""
        store = self.store
        store.delete_prefix(self.key, first=(MANIFEST,))
        store.upload_dir(local, self.key, last=(MANIFEST,), skip=() if commit else (MANIFEST,))

    def commit(self, local: Path) -> None:
        self.store.upload_file(Path(local) / MANIFEST, self.join_key(MANIFEST))

    def download(self, local: Path, require_manifest: bool = True) -> None:
        store, local = self.store, Path(local)
        if require_manifest and not store.exists(self.join_key(MANIFEST)):
            raise FileNotFoundError(errno.ENOENT, f"{self.url} is incomplete or missing (no {MANIFEST})", self.url)
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        got = store.download_dir(self.key, local, last=(MANIFEST,))
        if require_manifest and MANIFEST not in got:    # removed while we read: pruned or replaced meanwhile
            raise FileNotFoundError(errno.ENOENT, f"{self.url} was removed while it was being downloaded", self.url)


@contextlib.contextmanager
def storage_errors(what: str, where):
    """Turns a store failure after its retries (RemoteError) into a StorageError."""
    try:
        yield
    except RemoteError as e:
        raise StorageError(f"cannot {what} {where}: {e.strerror} (nothing was changed; "
                           f"run again when the store answers)") from None
