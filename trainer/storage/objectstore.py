"""Object-store clients: s3:// (boto3) and gs:// (google-cloud-storage), each imported lazily.

One bucket is a `Store` with a few operations (list, stat, read, upload, download, delete, create-if-absent);
trainer.storage.location builds directories and the checkpoint commit rule on top of them.

Every call has a connect and a read timeout, and a call that fails for a reason that may pass (network, server
errors, timeouts) is retried with exponential backoff a bounded number of times ($TRICHIP_STORE_ATTEMPTS, default
4; $TRICHIP_STORE_TIMEOUT seconds per attempt, default 20), so an outage of a few seconds is ridden out and a dead
endpoint fails within about attempts x timeout, never hangs.

Credentials come from each SDK's usual places: boto3's AWS_* environment variables, ~/.aws/ files,
instance roles (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL point it at an S3-compatible server); and
google-cloud-storage's Application Default Credentials (STORAGE_EMULATOR_HOST points it at an emulator).

Framework-free: no jax, no torch. Errors the user fixes (no credentials, access denied, no such bucket,
SDK not installed) are one-line hal.base.UserErrors; anything else a transfer meets (network, server
errors after the SDK's retries) is a RemoteError, an OSError, so the checkpoint-save policy applies.
"""
from __future__ import annotations

import abc
import concurrent.futures
import logging
import os
import threading
import time
from pathlib import Path

from models.errors import StorageError, UserError, first_line

log = logging.getLogger("trichip")

SCHEMES = ("s3", "gs")
_WORKERS = 8            # files transferred at once (each large one is also split into parts by the SDK)


def _attempts() -> int:
    return max(1, int(os.environ.get("TRICHIP_STORE_ATTEMPTS", "4")))


def _timeout() -> float:
    return float(os.environ.get("TRICHIP_STORE_TIMEOUT", "20"))


class RemoteError(OSError):
    """A transfer to or from an object store failed (network, server); strerror is the one-line reason."""

    def __init__(self, message: str):
        super().__init__(message)
        self.strerror = message


class Store(abc.ABC):
    """One bucket. Keys are object names; a "directory" is a key prefix ending in '/'."""

    scheme: str
    bucket: str

    # -- what each service implements ------------------------------------------------------------
    @abc.abstractmethod
    def _error(self, e: BaseException, what: str, key: str = "") -> Exception:
        """The exception to raise for a failed call: UserError for what the user fixes, else RemoteError."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise UserError unless the bucket exists and these credentials can list it."""

    @abc.abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-"directories" of prefix ('' = the bucket's top level)."""

    @abc.abstractmethod
    def list_files(self, prefix: str) -> list[str]:
        """Every key under prefix/ (recursively)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def upload_file(self, local: Path, key: str) -> None: ...

    @abc.abstractmethod
    def download_file(self, key: str, local: Path) -> None: ...

    @abc.abstractmethod
    def delete(self, keys: list[str]) -> None: ...

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write the object only if no object has that key (atomically, on the server); False if one had."""

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), retried with backoff while it fails for a reason that may pass."""
        attempts = _attempts()
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                error = self._error(e, what, key)
                if isinstance(error, UserError) or attempt == attempts - 1:
                    raise error from None
                log.warning("%s (attempt %d of %d; retrying)", error, attempt + 1, attempts)
                time.sleep(min(8.0, 0.5 * 2 ** attempt))

    # -- built on those ----------------------------------------------------------------------------
    def url(self, key: str = "") -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    def upload_dir(self, local_dir, prefix: str, last=(), skip=()) -> list[str]:
        """Upload every file under local_dir to prefix/<relative path>; the files named in `last` (relative
        paths) after all the others are in place, those in `skip` not at all. Returns the keys written."""
        local_dir = Path(local_dir)
        files = sorted(str(p.relative_to(local_dir)).replace(os.sep, "/") for p in local_dir.rglob("*")
                       if p.is_file())
        first = [f for f in files if f not in last and f not in skip]
        _parallel(lambda rel: self.upload_file(local_dir / rel, _join(prefix, rel)), first)
        for rel in last:
            if rel in files and rel not in skip:
                self.upload_file(local_dir / rel, _join(prefix, rel))
        return [_join(prefix, rel) for rel in files if rel not in skip]

    def download_dir(self, prefix: str, local_dir, last=()) -> list[str]:
        """Download every object under prefix/ into local_dir (made if missing); those named in `last`
        (relative paths) after all the others. Returns the relative paths written."""
        local_dir = Path(local_dir)
        strip = len(prefix) + 1 if prefix else 0
        rels = sorted(k[strip:] for k in self.list_files(prefix))
        rels = [r for r in rels if r and not r.endswith("/")]       # "directory" placeholder objects

        def get(rel):
            target = local_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.download_file(_join(prefix, rel), target)
        _parallel(get, [r for r in rels if r not in last])
        for rel in last:
            if rel in rels:
                get(rel)
        return rels

    def delete_prefix(self, prefix: str, first=()) -> None:
        """Delete every object under prefix/; the keys prefix/<f> for f in `first` before the rest."""
        if not prefix:
            raise ValueError("refusing to delete a whole bucket")
        keys = self.list_files(prefix)
        head = [f"{prefix}/{f}" for f in first if f"{prefix}/{f}" in keys]
        if head:
            self.delete(head)
        rest = [k for k in keys if k not in head]
        if rest:
            self.delete(rest)


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _parallel(fn, items) -> None:
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    pool = concurrent.futures.ThreadPoolExecutor(min(_WORKERS, len(items)))
    try:
        futures = [pool.submit(fn, item) for item in items]
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for future in futures:
            if future in done and future.exception() is not None:
                raise future.exception()
    finally:        # after a failure the queued transfers are dropped: a dead store fails once, not per file
        pool.shutdown(wait=True, cancel_futures=True)


def _quiet(*loggers: str) -> None:
    """The SDKs log each credential lookup and retry at INFO: not for the training console (unless the
    user set those loggers' levels)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


# -- S3 ---------------------------------------------------------------------------------------------

_AWS_CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
                         "credentials), or AWS_PROFILE with ~/.aws/credentials, or run where an instance role "
                         "provides them")


class S3Store(Store):
    """Amazon S3, or an S3-compatible server at $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL (MinIO, moto, R2...)."""

    scheme = "s3"

    def __init__(self, bucket: str):
        try:
            import boto3
            import botocore.config
        except ImportError:
            raise UserError("s3:// checkpoints need boto3: pip install boto3") from None
        self.bucket = bucket
        _quiet("botocore", "boto3", "s3transfer", "urllib3")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        config = botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1},
                                        connect_timeout=min(10.0, _timeout()), read_timeout=_timeout(),
                                        max_pool_connections=2 * _WORKERS)
        try:
            self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        except Exception as e:   # e.g. no region for a custom endpoint, a malformed endpoint URL
            raise UserError(f"s3://{bucket}: cannot set up the S3 client ({first_line(e)})") from None
        import boto3.s3.transfer
        # one try per transfer in s3transfer too: trichip's _call retries, with a bound
        self.transfer_config = boto3.s3.transfer.TransferConfig(max_concurrency=4, num_download_attempts=1)

    def _error(self, e: BaseException, what: str, key: str = "") -> Exception:
        """The exception to raise for a failed call: UserError for what the user fixes, else RemoteError."""
        import botocore.exceptions as bx
        url = self.url(key)
        cause = e
        while not isinstance(cause, (bx.ClientError, bx.BotoCoreError)) and cause.__context__ is not None:
            cause = cause.__context__                      # boto3 wraps upload errors in S3UploadFailedError
        if isinstance(cause, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return UserError(f"no AWS credentials for {url}: {_AWS_CREDENTIALS_HINT}")
        if isinstance(cause, bx.ClientError):
            err = cause.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (what == "check" and (code == "404" or status == 404)):
                return UserError(f"bucket {self.bucket!r} does not exist ({url}): create it, or fix the URL")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                        "TokenRefreshRequired", "AccessDenied", "AllAccessDisabled", "403") or status == 403:
                return UserError(f"access to {url} denied ({code or status}): check the AWS credentials "
                                 f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE) "
                                 f"and the bucket's policy")
        if what == "check":
            return RemoteError(f"cannot reach {url}: {first_line(cause)}")
        return RemoteError(f"{what} {url} failed: {first_line(cause)}")

    def check(self) -> None:
        self._call("check", "", self.client.head_bucket, Bucket=self.bucket)

    def _list(self, prefix: str, **kwargs) -> list[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        return self._call("list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix,
                                                                            **kwargs)))

    def list_dirs(self, prefix: str) -> list[str]:
        p = f"{prefix}/" if prefix else ""
        return [c["Prefix"][len(p):].rstrip("/") for page in self._list(p, Delimiter="/")
                for c in page.get("CommonPrefixes", [])]

    def list_files(self, prefix: str) -> list[str]:
        return [o["Key"] for page in self._list(f"{prefix}/" if prefix else "") for o in page.get("Contents", [])]

    def exists(self, key: str) -> bool:
        import botocore.exceptions as bx

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
                return True
            except bx.ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise
        return self._call("stat", key, head)

    def create(self, key: str, data: bytes) -> bool:
        import botocore.exceptions as bx

        def put() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except bx.ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    return False
                raise
        return self._call("create", key, put)

    def read_bytes(self, key: str) -> bytes:
        return self._call("read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def upload_file(self, local: Path, key: str) -> None:
        self._call("upload to", key, self.client.upload_file, str(local), self.bucket, key,
                   Config=self.transfer_config)

    def download_file(self, key: str, local: Path) -> None:
        self._call("download of", key, self.client.download_file, self.bucket, key, str(local),
                   Config=self.transfer_config)

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            r = self._call("delete in", batch[0], self.client.delete_objects, Bucket=self.bucket,
                           Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if r.get("Errors"):
                e = r["Errors"][0]
                raise RemoteError(f"delete of {self.url(e.get('Key', ''))} failed: {e.get('Code')} "
                                  f"{e.get('Message', '')}".strip())


# -- Google Cloud Storage ---------------------------------------------------------------------------

_GCS_CREDENTIALS_HINT = ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
                         "`gcloud auth application-default login`, or run where the metadata server provides them")


class GCSStore(Store):
    """Google Cloud Storage through google-cloud-storage (or an emulator at $STORAGE_EMULATOR_HOST)."""

    scheme = "gs"

    def __init__(self, bucket: str):
        try:
            from google.cloud import storage
        except ImportError:
            raise UserError("gs:// checkpoints need google-cloud-storage: pip install google-cloud-storage") from None
        self.bucket = bucket
        _quiet("google", "urllib3")
        try:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials
                self.client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"),
                                             credentials=AnonymousCredentials())
            else:
                self.client = storage.Client()
        except Exception as e:
            raise self._error(e, "check") from None
        self.handle = self.client.bucket(bucket)

    def _error(self, e: BaseException, what: str, key: str = "") -> Exception:
        url = self.url(key)
        try:
            from google.api_core import exceptions as gx
            from google.auth import exceptions as ax
        except ImportError:      # pragma: no cover - both come with google-cloud-storage
            return RemoteError(f"{what} {url} failed: {first_line(e)}")
        if isinstance(e, (ax.DefaultCredentialsError, ax.RefreshError)):
            return UserError(f"no usable Google Cloud credentials for {url}: {_GCS_CREDENTIALS_HINT}")
        if isinstance(e, gx.NotFound) and (what == "check" or "bucket" in str(e).lower()):
            return UserError(f"bucket {self.bucket!r} does not exist ({url}): create it, or fix the URL")
        if isinstance(e, (gx.Forbidden, gx.Unauthorized)):
            return UserError(f"access to {url} denied ({first_line(e)}): check the credentials "
                             f"(GOOGLE_APPLICATION_CREDENTIALS) and the bucket's IAM roles")
        if what == "check":
            return RemoteError(f"cannot reach {url}: {first_line(e)}")
        return RemoteError(f"{what} {url} failed: {first_line(e)}")

    def check(self) -> None:
        # listing needs only object-level roles (storage.objects.list); getting the bucket needs more
        self._call("check", "", lambda: list(self.client.list_blobs(self.bucket, max_results=1, timeout=_timeout(),
                                                                    retry=None)))

    def list_dirs(self, prefix: str) -> list[str]:
        p = f"{prefix}/" if prefix else ""

        def run():
            it = self.client.list_blobs(self.bucket, prefix=p, delimiter="/", timeout=_timeout(), retry=None)
            for _ in it:      # the prefixes are filled in page by page
                pass
            return sorted(it.prefixes)
        return [d[len(p):].rstrip("/") for d in self._call("list", p, run)]

    def list_files(self, prefix: str) -> list[str]:
        p = f"{prefix}/" if prefix else ""
        return self._call("list", p, lambda: [b.name for b in self.client.list_blobs(self.bucket, prefix=p,
                                                                                 timeout=_timeout(), retry=None)])

    def exists(self, key: str) -> bool:
        return self._call("stat", key, self.handle.blob(key).exists, timeout=_timeout(), retry=None)

    def read_bytes(self, key: str) -> bytes:
        return self._call("read", key, self.handle.blob(key).download_as_bytes, timeout=_timeout(), retry=None)

    def upload_file(self, local: Path, key: str) -> None:
        self._call("upload to", key, self.handle.blob(key).upload_from_filename, str(local), timeout=_timeout(),
                   retry=None)

    def download_file(self, key: str, local: Path) -> None:
        self._call("download of", key, self.handle.blob(key).download_to_filename, str(local),
                   timeout=_timeout(), retry=None)

    def create(self, key: str, data: bytes) -> bool:
        from google.api_core import exceptions as gx

        def put() -> bool:
            try:
                self.handle.blob(key).upload_from_string(data, if_generation_match=0, timeout=_timeout(),
                                                         retry=None)
                return True
            except gx.PreconditionFailed:
                return False
        return self._call("create", key, put)

    def delete(self, keys: list[str]) -> None:
        from google.api_core import exceptions as gx

        def one(key):
            try:
                self.handle.blob(key).delete(timeout=_timeout(), retry=None)
            except gx.NotFound:
                pass          # already gone
        for key in keys:
            self._call("delete of", key, one, key)


_STORES = {"s3": S3Store, "gs": GCSStore}
_open: dict[tuple[str, str], Store] = {}
_lock = threading.Lock()


def open_store(scheme: str, bucket: str) -> Store:
    """The Store of one bucket, made and checked (credentials, existence) once per process."""
    with _lock:
        store = _open.get((scheme, bucket))
        if store is None:
            store = _STORES[scheme](bucket)
            try:
                store.check()
            except RemoteError as e:      # unreachable after the retries: nothing read, nothing changed
                raise StorageError(str(e)) from None
            _open[(scheme, bucket)] = store
        return store


def forget_stores() -> None:
    """Drop the cached clients (after the environment's credentials or endpoint changed)."""
    with _lock:
        _open.clear()
