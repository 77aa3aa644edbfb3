"""Durable writes and ownership: what this program writes is atomic, fsynced and marked as ours.

Writes go to a hidden `*.partial` beside the target, are fsynced, then renamed over it (a reader
sees the old file or the whole new one). Everything this program creates for a user (a store, a
tune run folder, a packed zip, a saved eval JSON) carries a small positive mark naming the program,
the kind of thing and the version; a command replaces or deletes only paths carrying the right
mark, and inside them only its own entries. `paths_overlap` keeps an output from landing on, in
or around one of the command's inputs.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from store.location import is_url

PROGRAM = "dwq-pipeline"
MARK_FILE = ".dwq-pipeline.json"  # in a folder this program made: a store or a tune run
PARTIAL_SUFFIX = ".partial"


# ---- atomic, durable writes --------------------------------------------------------------------


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write, fsync, then rename: a reader sees the old file or the whole new one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    with open(partial, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=True))


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (making the renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- ownership marks ---------------------------------------------------------------------------


@functools.cache
def program_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PROGRAM)
    except PackageNotFoundError:
        return "unknown"


def mark(kind: str) -> dict[str, str]:
    """The mark of a `kind` ('store', 'run', 'pack', 'eval') written by this program."""
    return {"program": PROGRAM, "kind": kind, "version": program_version()}


def is_mark(raw: Any, kind: str) -> bool:
    """Does `raw` (a parsed mark, or a JSON object carrying the mark's keys) say `kind` by us?"""
    return isinstance(raw, dict) and raw.get("program") == PROGRAM and raw.get("kind") == kind


def is_mark_bytes(raw: bytes | None, kind: str) -> bool:
    try:
        return is_mark(json.loads(raw), kind) if raw else False
    except (ValueError, UnicodeDecodeError):
        return False


def write_mark(folder: Path, kind: str) -> None:
    write_json_atomic(Path(folder) / MARK_FILE, mark(kind))


def has_mark(folder: Path, kind: str) -> bool:
    """Does `folder` carry this program's mark of `kind`? (False for anything unreadable.)"""
    try:
        return is_mark_bytes((Path(folder) / MARK_FILE).read_bytes(), kind)
    except OSError:
        return False


def is_ours(name: str, own: Iterable[str]) -> bool:
    """Is the folder entry `name` one of `own`, the mark, or a partial write of ours?"""
    return name in set(own) | {MARK_FILE} or (
        name.startswith(".") and name.endswith(PARTIAL_SUFFIX)
    )


def foreign_entries(folder: Path, own: Iterable[str]) -> list[str]:
    """Entries of `folder` this program did not write (sorted); [] for a missing folder."""
    own = set(own)
    try:
        return sorted(p.name for p in Path(folder).iterdir() if not is_ours(p.name, own))
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_owned(folder: Path, own: Iterable[str]) -> list[str]:
    """Delete only our entries of `folder` (and the folder once nothing else is left in it).

    Returns what was left: entries someone else put there, which are never touched."""
    own = set(own)
    for path in Path(folder).iterdir():
        if is_ours(path.name, own):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    left = foreign_entries(folder, own)
    if not left:
        Path(folder).rmdir()
    return left


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` if it is a file (then `path` cannot be made)."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


# ---- overlap of inputs and outputs -------------------------------------------------------------


def paths_overlap(a: str | Path, b: str | Path) -> bool:
    """Are `a` and `b` the same path, or is one inside the other (symlinks resolved)?

    A URL never overlaps a local path; two URLs overlap when one is a prefix of the other."""
    a_url, b_url = is_url(str(a)), is_url(str(b))
    if a_url or b_url:
        if not (a_url and b_url):
            return False
        x, y = str(a).rstrip("/") + "/", str(b).rstrip("/") + "/"
        return x.startswith(y) or y.startswith(x)
    x, y = Path(a).resolve(), Path(b).resolve()
    return x == y or x in y.parents or y in x.parents
