"""Where a store lives, for reading: a local folder, a zip file made by `store pack`, or a URL
that fsspec reads (s3://, gs://, http(s)://, ...). All three show the same keys
('manifest.json', 'records/train/00000000.json', 'train/topk_logits/c/0/0/0', ...).

Writing happens in a local folder (fsync, atomic renames); `targets` to a URL computes in a local
staging folder and uploads each finished chunk (store/publish.py).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from store.errors import StoreError


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


def is_url(spec: str) -> bool:
    return "://" in spec


class StoreLocation:
    def __init__(self, spec: str | Path, storage_options: dict[str, Any] | None = None):
        self.spec = str(spec)
        self.storage_options = dict(storage_options or {})
        self.fs: Any = None
        self.zip: zipfile.ZipFile | None = None
        if is_url(self.spec):
            self.kind = "remote"
            self._open_remote()
        elif self.spec.endswith(".zip") and Path(self.spec).is_file():
            self.kind = "zip"
            self.zip = zipfile.ZipFile(self.spec)
            self.names = set(self.zip.namelist())
        else:
            self.kind = "local"
            self.root = Path(self.spec)

    def _open_remote(self) -> None:
        import fsspec

        try:
            self.fs, self.root_path = fsspec.core.url_to_fs(self.spec, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open {self.spec}: {exc}") from exc
        self.root_path = self.root_path.rstrip("/")

    def __str__(self) -> str:
        return self.spec

    @property
    def local_path(self) -> Path | None:
        return self.root if self.kind == "local" else None

    def _remote(self, key: str) -> str:
        return f"{self.root_path}/{key}" if key else self.root_path

    def exists(self, key: str = "") -> bool:
        if self.kind == "local":
            return (self.root / key).exists() if key else self.root.exists()
        if self.kind == "zip":
            return not key or key in self.names
        try:
            return bool(self.fs.exists(self._remote(key)))
        except OSError:
            return False

    def read_bytes(self, key: str) -> bytes | None:
        """The file's bytes, or None when it is absent."""
        try:
            if self.kind == "local":
                return (self.root / key).read_bytes()
            if self.kind == "zip":
                return self.zip.read(key) if key in self.names else None
            return self.fs.cat_file(self._remote(key))
        except (FileNotFoundError, IsADirectoryError):
            return None

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """Several files at once (concurrent requests for a remote store)."""
        if self.kind != "remote" or not keys:
            return {key: self.read_bytes(key) for key in keys}
        found = self.fs.cat([self._remote(k) for k in keys], on_error="omit")
        return {key: found.get(self._remote(key)) for key in keys}

    def keys_under(self, prefix: str) -> dict[str, int]:
        """Every file below `prefix`: key -> size in bytes."""
        if self.kind == "local":
            folder = self.root / prefix
            if not folder.is_dir():
                return {}
            return {
                str(p.relative_to(self.root)): p.stat().st_size
                for p in folder.rglob("*")
                if p.is_file()
            }
        if self.kind == "zip":
            start = prefix.rstrip("/") + "/"
            return {
                i.filename: i.file_size for i in self.zip.infolist() if i.filename.startswith(start)
            }
        try:
            found = self.fs.find(self._remote(prefix), detail=True)
        except FileNotFoundError:
            return {}
        skip = len(self.root_path) + 1
        return {path[skip:]: int(info.get("size") or 0) for path, info in found.items()}

    def zarr_store(self):
        """A read-only zarr store over the same keys."""
        import zarr

        if self.kind == "local":
            return zarr.storage.LocalStore(self.root, read_only=True)
        if self.kind == "zip":
            return zarr.storage.ZipStore(self.spec, mode="r")
        return zarr.storage.FsspecStore.from_url(
            self.spec, storage_options=self.storage_options, read_only=True
        )
