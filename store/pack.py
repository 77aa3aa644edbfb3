"""`store pack`: a whole store as one zip file, for copying to another machine.

Members are stored, not recompressed (the chunks are compressed already). Tune, eval, `store
info` and `store verify` read the zip directly (zarr's ZipStore); lock files are left out.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from store.errors import StoreError
from store.reader import StoreReader
from store.writer import LOCKS_DIR


@dataclass(frozen=True)
class PackResult:
    path: Path
    files: int
    bytes: int
    chunks_missing: int


def pack_store(store: str | Path, out: Path, storage_options: dict | None = None) -> PackResult:
    reader = StoreReader(store, storage_options)  # refuses what is not a readable store
    out = Path(out)
    if out.suffix != ".zip":
        raise StoreError(f"the packed store must be a .zip file (got {out})")
    keys = sorted(k for k in reader.location.keys_under("") if not k.startswith(f"{LOCKS_DIR}/"))
    records = reader.records()
    missing = sum(s.num_chunks - len(records[n]) for n, s in reader.manifest.splits.items())
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
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return PackResult(path=out, files=len(keys), bytes=written, chunks_missing=missing)
