"""Writing a store to object storage: `targets --store s3://...`.

Chunks are computed into a local staging store (where fsync and atomic renames work), and each
one is uploaded as soon as it is done: its array files first, its record last, so a reader never
sees a record before its data. The remote store is the truth on resume: chunks recorded there
are not computed again, even from another machine or with the staging folder gone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from store.errors import StoreError, StoreMismatchError
from store.layout import LOCKS_DIR, MANIFEST_FILE, RECORDS_DIR, chunk_key, record_key
from store.location import FsspecLocation
from store.manifest import Manifest, describe_differences, read_manifest
from store.records import read_records
from store.writer import StoreWriter


def staging_path(url: str, staging_dir: str | Path) -> Path:
    """The local folder a remote store is computed in (one per URL)."""
    return Path(staging_dir) / f"{hashlib.blake2b(url.encode(), digest_size=8).hexdigest()}.zarr"


class Publisher:
    def __init__(self, url: str, storage_options: dict, writer: StoreWriter):
        self.remote = FsspecLocation(url, storage_options)
        self.fs, self.root = self.remote.fs, self.remote.root_path
        self.writer = writer

    def _put(self, key: str) -> None:
        try:
            self.fs.put_file(str(self.writer.path / key), f"{self.root}/{key}")
        except OSError as exc:
            raise StoreError(
                f"uploading {key} to {self.remote} failed: {exc}; chunks uploaded before are "
                "kept, re-run to resume"
            ) from exc

    def start(self) -> set[tuple[str, int]]:
        """Create the remote store (or check it matches); returns the chunks done there."""
        manifest: Manifest = self.writer.manifest
        if self.remote.exists(MANIFEST_FILE):
            differences = read_manifest(self.remote).differences(manifest)
            if differences:
                raise StoreMismatchError(
                    f"store {self.remote} was made differently "
                    f"({describe_differences(differences)}); choose another --store"
                )
        else:
            self._publish_skeleton()
        done = read_records(self.remote, manifest)
        return {(split, chunk) for split, records in done.items() for chunk in records}

    def _publish_skeleton(self) -> None:
        """Everything but target chunks, records and locks; the manifest last."""
        splits = self.writer.manifest.splits
        chunk_dirs = tuple(
            f"{split}/{name}/c/" for split, shape in splits.items() for name in shape.target_arrays
        )
        for path in sorted(self.writer.path.rglob("*")):
            key = str(path.relative_to(self.writer.path))
            skip = key.startswith((f"{RECORDS_DIR}/", f"{LOCKS_DIR}/", *chunk_dirs))
            if path.is_file() and not skip and key != MANIFEST_FILE:
                self._put(key)
        self._put(MANIFEST_FILE)

    def publish_chunk(self, split: str, chunk: int) -> None:
        for name in self.writer.manifest.splits[split].target_arrays:
            ndim = self.writer.root[split][name].ndim
            self._put(chunk_key(split, name, chunk, ndim))
        self._put(record_key(split, chunk))


class PublishingWriter(StoreWriter):
    """The writer of a store at a URL: chunks are written to the local staging store, then
    uploaded. Chunks recorded in the remote store count as done."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        repaired: list[str] | None = None,
        *,
        url: str,
        storage_options: dict,
    ):
        super().__init__(path, manifest, repaired)
        self.publisher = Publisher(url, storage_options, self)
        self._done_remotely: set[tuple[str, int]] | None = None

    def repair(
        self, sequences: dict[str, dict[str, np.ndarray]], chunks: dict[str, list[int]]
    ) -> list[str]:
        """The staging store's repair, then the remote store's: created, or checked against the
        manifest, and each of `chunks` finished in staging but not uploaded is uploaded."""
        repaired = super().repair(sequences, chunks)
        done_remotely = self.done_remotely()
        for split, mine in chunks.items():
            for chunk in sorted(self.done_chunks(split) & set(mine)):
                if (split, chunk) not in done_remotely:
                    self.publisher.publish_chunk(split, chunk)
                    done_remotely.add((split, chunk))
        return repaired

    def done_remotely(self) -> set[tuple[str, int]]:
        """(split, chunk) of every chunk recorded in the remote store (created on first use)."""
        if self._done_remotely is None:
            self._done_remotely = self.publisher.start()
        return self._done_remotely

    def missing_chunks(self, split: str, shard_index: int = 0, shard_count: int = 1) -> list[int]:
        """Chunks done neither in staging nor in the remote store."""
        done_remotely = self.done_remotely()
        missing = super().missing_chunks(split, shard_index, shard_count)
        return [c for c in missing if (split, c) not in done_remotely]

    def write_chunk(
        self, split: str, chunk: int, targets: dict[str, np.ndarray], shard: str
    ) -> None:
        super().write_chunk(split, chunk, targets, shard)
        self.publisher.publish_chunk(split, chunk)
        self.done_remotely().add((split, chunk))
