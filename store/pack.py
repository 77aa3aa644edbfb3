"""`store pack`: a whole store as one zip file, for copying to another machine.

Members are stored, not recompressed (the chunks are compressed already). Tune, eval, `store
info` and `store verify` read the zip directly (zarr's ZipStore); lock files are left out. The
zip's comment is this program's pack mark: an existing file is replaced only with `overwrite`
and only if it carries that mark (a zip this command wrote).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from store.durable import file_in_the_way, is_mark_bytes, mark, paths_overlap
from store.errors import StoreError
from store.layout import LOCKS_DIR
from store.location import is_url, local_spec
from store.reader import StoreReader

PACK_MARK = "pack"


@dataclass(frozen=True)
class PackResult:
    path: Path
    files: int
    bytes: int
    chunks_missing: int


def is_packed_store(path: Path) -> bool:
    """Is `path` a zip that `store pack` wrote (its comment carries the pack mark)?"""
    try:
        with zipfile.ZipFile(path) as archive:
            return is_mark_bytes(archive.comment, PACK_MARK)
    except (OSError, zipfile.BadZipFile):
        return False


def _check_out(store: str | Path, out: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, an out path that would harm the store or a file."""
    if out.suffix != ".zip":
        raise StoreError(f"the packed store must be a .zip file (got {out})")
    if paths_overlap(store, out):
        raise StoreError(
            f"{out} is the store {store} itself or lies inside it; write the zip elsewhere"
        )
    if out.is_dir():
        raise StoreError(f"{out} is a folder; name a .zip file to write")
    if file_in_the_way(out) is not None:
        raise StoreError(f"{out} lies under the file {file_in_the_way(out)}; choose another path")
    if out.exists() and not overwrite:
        raise StoreError(f"{out} exists; pass --overwrite to replace a zip made by store pack")
    if out.exists() and not is_packed_store(out):
        raise StoreError(
            f"{out} exists and was not written by `dwq-pipeline store pack`; it is never "
            "replaced: choose another path"
        )


def pack_store(
    store: str | Path, out: Path, storage_options: dict | None = None, overwrite: bool = False
) -> PackResult:
    if not str(store).strip() or not str(out).strip():
        raise StoreError("store pack: the store and the zip path must not be empty")
    if is_url(str(out)):
        raise StoreError(f"store pack writes a local .zip file, not {out}")
    out = Path(local_spec(out))
    _check_out(store, out, overwrite)
    reader = StoreReader(store, storage_options)  # refuses what is not a readable store
    keys = sorted(k for k in reader.location.keys_under("") if not k.startswith(f"{LOCKS_DIR}/"))
    if not keys:  # a pack without the store's files would pass for one
        raise StoreError(f"store pack found no files in {store}; nothing was written")
    missing = sum(len(reader.missing_chunks(split)) for split in reader.manifest.splits)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    written = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key in keys:
                data = reader.location.read_bytes(key)
                if data is None:  # removed while packing (a writer replacing a record)
                    continue
                archive.writestr(key, data)
                written += len(data)
            archive.comment = json.dumps(mark(PACK_MARK)).encode()
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return PackResult(path=out, files=len(keys), bytes=written, chunks_missing=missing)
