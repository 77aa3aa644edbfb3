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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from store.location import is_url, local_spec

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


def read_mark_kind(folder: Path) -> str | None:
    """The kind in `folder`'s mark when this program wrote it ('store', 'run', ...), else None."""
    try:
        raw = json.loads((Path(folder) / MARK_FILE).read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return raw.get("kind") if isinstance(raw, dict) and raw.get("program") == PROGRAM else None


def has_mark(folder: Path, kind: str) -> bool:
    """Does `folder` carry this program's mark of `kind`? (False for anything unreadable.)"""
    try:
        return is_mark_bytes((Path(folder) / MARK_FILE).read_bytes(), kind)
    except OSError:
        return False


def is_ours(name: str, own: Iterable[str]) -> bool:
    """Is the folder entry `name` one of `own`, the mark, or a partial write of ours?"""
    return name in set(own) | {MARK_FILE} or is_partial_name(name)


def is_partial_name(name: str) -> bool:
    """A hidden `.NAME.PID.partial` left by `write_bytes_atomic` (or a swap) of ours."""
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


# Which files of a folder are ours: a predicate on a relative key ('train/tokens/zarr.json'; a
# folder's key ends with '/'), or top-level names whose whole subtree is ours.
Owned = Callable[[str], bool] | Iterable[str]


def _owned_predicate(own: Owned) -> Callable[[str], bool]:
    if callable(own):
        return own
    names = set(own)
    return lambda key: is_ours(key.split("/")[0], names)


def _walk(folder: Path) -> Iterable[tuple[str, Path]]:
    """(key, path) of every entry below `folder`, parents before children; symlinks are
    listed, never followed."""
    for path in sorted(Path(folder).iterdir()):
        is_folder = path.is_dir() and not path.is_symlink()
        key = path.name + ("/" if is_folder else "")
        yield key, path
        if is_folder:
            yield from ((f"{path.name}/{k}", p) for k, p in _walk(path))


def foreign_entries(folder: Path, own: Owned) -> list[str]:
    """Keys of entries below `folder` this program did not write (sorted, a foreign folder
    named once, not its contents); [] for a missing folder. A symlink is never ours."""
    is_own = _owned_predicate(own)
    foreign: list[str] = []
    try:
        for key, path in _walk(folder):
            if any(key.startswith(f) for f in foreign):
                continue
            base = key.rstrip("/").rsplit("/", 1)[-1]
            if path.is_symlink() or not (is_own(key) or is_partial_name(base)):
                foreign.append(key)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(foreign)


def remove_owned(folder: Path, own: Owned) -> list[str]:
    """Delete only our entries below `folder` (each folder once nothing else is left in it; a
    symlink `folder` is never followed). Returns what was left: entries someone else put
    there, which are never touched."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise OSError(f"{folder} is not a folder of ours (a symlink or a file): left as it is")
    left = foreign_entries(folder, own)
    for key, path in reversed(list(_walk(folder))):
        if any(key == f or key.startswith(f) for f in left if f.endswith("/")) or key in left:
            continue
        if key.endswith("/"):
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()
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

    A file:// URL is its local path; any other URL never overlaps a local path; two URLs
    overlap when one is a prefix of the other."""
    a, b = local_spec(a), local_spec(b)  # file:///x is the folder /x
    a_url, b_url = is_url(a), is_url(b)
    if a_url or b_url:
        if not (a_url and b_url):
            return False
        x, y = str(a).rstrip("/") + "/", str(b).rstrip("/") + "/"
        return x.startswith(y) or y.startswith(x)
    x, y = Path(a).resolve(), Path(b).resolve()
    return x == y or x in y.parents or y in x.parents
