"""A lock saying which process works on something (a shard of a store, a tune run).

The lock is an flock on a small file that also names its holder. The kernel drops the flock
when its process dies, however it dies, so a lock left by a dead process is simply taken over;
one held by a live process is refused with a message naming it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from store.errors import StoreError


class LockedError(StoreError):
    """Another live process holds the lock."""


def _holder(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {owner['pid']} on {owner['host']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def hold_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file `path` for `what` (e.g. 'shard 0/2 of store X') in the with-block."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot create the lock {path}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{what} is in use by {_holder(fd)}; wait for it to finish or stop it first"
            ) from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays, so no one locks an unlinked inode
