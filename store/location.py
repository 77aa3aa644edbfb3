"""Where a store lives, for reading: a local folder, a zip file made by `store pack`, or a URL
that fsspec reads (s3://, gs://, http(s)://, ...), one class each behind `StoreLocation` (as
zarr-python has one store class per backend); `open_location` picks it. All three show the same keys
('manifest.json', 'records/train/00000000.json', 'train/topk_logits/c/0/0/0', ...).

Writing happens in a local folder (fsync, atomic renames); `targets` to a URL computes in a local
staging folder and uploads each finished chunk (store/publish.py).
"""

from __future__ import annotations

import socket
import time
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from store.errors import StoreCorruptError, StoreError

T = TypeVar("T")
REMOTE_TRIES = 4  # a transient failure (network, timeout, throttling, 5xx) is retried this often
BACKOFF_S = 0.5  # ... after 0.5, 1, 2 s
DENIED, UNREACHABLE, THROTTLED = "access denied", "could not reach", "throttled or failing"
_DENIED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")
_THROTTLED_CODES = ("SlowDown", "Throttl", "RequestLimitExceeded", "ServiceUnavailable")
_UNREACHABLE_TYPES = {
    "ClientConnectionError",  # aiohttp (http, s3fs, gcsfs)
    "ServerDisconnectedError",
    "EndpointConnectionError",  # botocore
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
}

# a host name that does not resolve (socket.gaierror) is an OSError but no ConnectionError
_UNREACHABLE_ERRORS = (ConnectionError, TimeoutError, socket.gaierror, socket.herror)


def remote_failure(exc: BaseException) -> str | None:
    """What kind of failure of object storage or HTTP `exc` is, or None when it is none of
    these (an absent file, a codec error, a bug). Judged by class names and codes, so neither
    botocore nor aiohttp needs to be installed."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return None
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc)
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(exc, PermissionError) or "NoCredentialsError" in names:
        return DENIED
    if any(code in text for code in _DENIED_CODES) or status in (401, 403):
        return DENIED
    if isinstance(exc, _UNREACHABLE_ERRORS) or names & _UNREACHABLE_TYPES:
        return UNREACHABLE
    if any(code in text for code in _THROTTLED_CODES):
        return THROTTLED
    if isinstance(status, int) and (status == 429 or status >= 500):
        return THROTTLED
    return None


def describe_remote_failure(kind: str, where: str, exc: BaseException, tries: int) -> str:
    detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if kind == DENIED:
        return (
            f"access denied to {where} ({detail}); check the credentials (AWS_ACCESS_KEY_ID, "
            "AWS_PROFILE, ... or --storage-option) and the permissions on it"
        )
    if kind == UNREACHABLE:
        return (
            f"could not reach {where} after {tries} tries ({detail}); check the network and the "
            "endpoint (--storage-option endpoint_url=...), then re-run"
        )
    return f"{where} kept failing after {tries} tries ({detail}); wait a little and re-run"


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """['key=value', ...] -> options for fsspec; values read as YAML scalars (numbers, bools)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StoreError(f"--storage-option must look like key=value (got {pair!r})")
        options[key] = yaml.safe_load(value)
    return options


LOCAL_SCHEMES = ("file://", "local://")  # fsspec's spellings of a local path
# fsspec protocols whose files live only in this process: a store there would vanish at exit
VOLATILE_SCHEMES = ("memory://",)


def local_spec(spec: str | Path) -> str:
    """`spec` with a file:// (or local://) URL spelled as the local path it names."""
    text = str(spec)
    for scheme in LOCAL_SCHEMES:
        if text.startswith(scheme):
            from urllib.parse import unquote

            path = unquote(text[len(scheme) :])
            return path if path.startswith("/") else f"/{path}" if scheme == "file://" else path
    return text


def is_url(spec: str | Path) -> bool:
    """Is `spec` a URL of a remote store (a file:// URL is a local path, not one)?"""
    return "://" in local_spec(spec)


def check_persistent(spec: str | Path, role: str = "--store") -> None:
    """Refuse a URL whose files vanish when this process ends (memory://)."""
    if str(spec).startswith(VOLATILE_SCHEMES):
        raise StoreError(
            f"{role} {spec}: a {str(spec).split(':')[0]}:// store lives only inside one process "
            "and would be lost at exit; give a folder or an object-store URL"
        )


class StoreLocation(ABC):
    """A store's keys, read-only, wherever it lives. `spec` is what the user named it by."""

    spec: str

    def __str__(self) -> str:
        return self.spec

    def call(self, operation: Callable[[], T], key: str = "") -> T:
        """Run a read of this store (see FsspecLocation.call: retried there)."""
        return operation()

    @abstractmethod
    def exists(self, key: str = "") -> bool:
        """Is `key` there ('' for the store itself)?"""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes | None:
        """The file's bytes, or None when it is absent."""

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """Several files at once (concurrent requests for a remote store)."""
        return {key: self.read_bytes(key) for key in keys}

    @abstractmethod
    def keys_under(self, prefix: str) -> dict[str, int]:
        """Every file below `prefix`: key -> size in bytes."""

    @abstractmethod
    def zarr_store(self) -> Any:
        """A read-only zarr store over the same keys."""


class FolderLocation(StoreLocation):
    """A store in a local folder."""

    def __init__(self, spec: str | Path):
        self.spec = str(spec)
        self.root = Path(self.spec)

    def exists(self, key: str = "") -> bool:
        return (self.root / key).exists() if key else self.root.exists()

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def keys_under(self, prefix: str) -> dict[str, int]:
        folder = self.root / prefix
        if not folder.is_dir():
            return {}
        return {
            str(p.relative_to(self.root)): p.stat().st_size
            for p in folder.rglob("*")
            if p.is_file()
        }

    def zarr_store(self) -> Any:
        import zarr

        return zarr.storage.LocalStore(self.root, read_only=True)


class ZipLocation(StoreLocation):
    """A store packed into one zip file by `store pack`."""

    def __init__(self, spec: str | Path):
        self.spec = str(spec)
        try:
            self.zip = zipfile.ZipFile(self.spec)
        except (zipfile.BadZipFile, OSError) as exc:
            raise StoreError(
                f"{self.spec} is not a readable zip ({exc}); copy it again, or pack the "
                "store again with `dwq-pipeline store pack`"
            ) from exc
        self.names = set(self.zip.namelist())

    def exists(self, key: str = "") -> bool:
        return not key or key in self.names

    def read_bytes(self, key: str) -> bytes | None:
        if key not in self.names:
            return None
        try:
            return self.zip.read(key)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:  # zlib.error too
            raise StoreCorruptError(
                f"{key} in {self.spec} is damaged ({exc}); copy the zip again or pack the store "
                "again with `dwq-pipeline store pack`"
            ) from exc

    def keys_under(self, prefix: str) -> dict[str, int]:
        start = prefix.rstrip("/") + "/" if prefix else ""
        return {
            i.filename: i.file_size
            for i in self.zip.infolist()
            if i.filename.startswith(start) and not i.is_dir()
        }

    def zarr_store(self) -> Any:
        import zarr

        return zarr.storage.ZipStore(self.spec, mode="r")


class FsspecLocation(StoreLocation):
    """A store at a URL that fsspec reads (s3://, gs://, http(s)://, ...)."""

    def __init__(self, spec: str, storage_options: dict[str, Any] | None = None):
        import fsspec

        self.spec = str(spec)
        self.storage_options = dict(storage_options or {})
        try:
            # some filesystems (ftp, sftp) connect as they are made
            self.fs, root_path = self.call(
                lambda: fsspec.core.url_to_fs(self.spec, **self.storage_options)
            )
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open {self.spec}: {exc}") from exc
        self.root_path = root_path.rstrip("/")

    def _remote(self, key: str) -> str:
        return f"{self.root_path}/{key}" if key else self.root_path

    def call(self, operation: Callable[[], T], key: str = "") -> T:
        """Run a read of this store. Transient failures (network, timeouts, throttling, 5xx) are
        retried with backoff, and failures are reported as what they are (access denied, could
        not reach) rather than as a missing or damaged file."""
        where = f"{self.spec}/{key}" if key else self.spec
        for attempt in range(1, REMOTE_TRIES + 1):
            try:
                return operation()
            except Exception as exc:
                kind = remote_failure(exc)
                if kind is None:
                    raise
                if kind == DENIED or attempt == REMOTE_TRIES:
                    raise StoreError(describe_remote_failure(kind, where, exc, attempt)) from exc
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def exists(self, key: str = "") -> bool:
        return bool(self.call(lambda: self.fs.exists(self._remote(key)), key))

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self.call(lambda: self.fs.cat_file(self._remote(key)), key)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        if not keys:
            return {}
        paths = [self._remote(k) for k in keys]
        found = self.call(lambda: _raise_first_failure(self.fs.cat(paths, on_error="return")))
        return {key: found.get(path) for key, path in zip(keys, paths, strict=True)}

    def keys_under(self, prefix: str) -> dict[str, int]:
        try:
            found = self.call(lambda: self.fs.find(self._remote(prefix), detail=True), prefix)
        except FileNotFoundError:
            return {}
        skip = len(self.root_path) + 1
        return {path[skip:]: int(info.get("size") or 0) for path, info in found.items()}

    def zarr_store(self) -> Any:
        import zarr

        return zarr.storage.FsspecStore.from_url(
            self.spec, storage_options=self.storage_options, read_only=True
        )


def open_location(
    store: StoreLocation | str | Path, storage_options: dict[str, Any] | None = None
) -> StoreLocation:
    """The location of the store named `store`: a URL, a .zip made by `store pack`, or a folder
    (one already opened is returned as it is)."""
    if isinstance(store, StoreLocation):
        return store
    spec = local_spec(store)
    if not spec.strip():
        raise StoreError("the store path must not be empty")
    if is_url(spec):
        return FsspecLocation(spec, storage_options)
    if Path(spec).is_file():
        if spec.endswith(".zip"):
            return ZipLocation(spec)
        raise StoreError(
            f"{spec} is a file, not a store: give a store folder, a .zip made by "
            "`dwq-pipeline store pack`, or a URL"
        )
    return FolderLocation(spec)


def _raise_first_failure(found: dict[str, Any]) -> dict[str, bytes | None]:
    """fsspec's cat(on_error="return") result: absent files become None, other errors raise."""
    for value in found.values():
        if isinstance(value, Exception) and not isinstance(value, FileNotFoundError):
            raise value
    return {path: None if isinstance(v, Exception) else v for path, v in found.items()}
