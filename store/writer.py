"""Creating a store, writing chunks atomically and durably, resuming, sharding and merging.

`open_store_for_writing` is the one way in: for a folder it returns a `StoreWriter`, for a URL a
`PublishingWriter` (store/publish.py) that writes in a local staging folder and uploads. Callers
hand over float32 logits, integer indices and tail values; the stored encodings are layout.py's.

A chunk is done when its bytes are fsynced and its record is written (both atomically). A crash at
any moment leaves either a done chunk or one that the next run recomputes from scratch.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import zarr

from store.durable import (
    MARK_FILE,
    PROGRAM,
    foreign_entries,
    fsync_path,
    has_mark,
    paths_overlap,
    read_mark_kind,
    remove_owned,
    write_mark,
)
from store.errors import ManifestUnreadable, StoreCorruptError, StoreError, StoreMismatchError
from store.layout import (
    LOCKS_DIR,
    MANIFEST_FILE,
    SCHEMA_ATTR,
    SEQUENCE_ARRAYS,
    ZARR_GROUP_FILE,
    chunk_key,
    is_store_key,
    zarr_codec_args,
)
from store.location import check_persistent, is_url, local_spec
from store.lock import hold_lock
from store.manifest import Manifest, describe_differences, read_manifest, write_manifest
from store.records import (
    ChunkRecord,
    array_checksum,
    chunks_for_shard,
    missing_chunks,
    read_records,
    record_path,
    write_record,
)

STORE_MARK = "store"


def owns_store(path: Path) -> bool:
    """Did this program write the store folder `path`? Its mark file says so; for a store written
    before marks existed (or a partial copy that lacks the mark), the schema attribute in its
    root zarr.json or a manifest.json of our schema does."""
    if has_mark(path, STORE_MARK):
        return True
    try:
        attributes = json.loads((Path(path) / ZARR_GROUP_FILE).read_bytes()).get("attributes")
        if isinstance(attributes, dict) and SCHEMA_ATTR in attributes:
            return True
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        pass
    try:
        return Path(path).is_dir() and read_manifest(path).producer == PROGRAM
    except (StoreError, OSError):
        return False


def enclosing_store(path: Path) -> Path | None:
    """The store folder `path` lies inside (not `path` itself), if any."""
    for parent in Path(path).resolve().parents:
        if owns_store(parent):
            return parent
    return None


def sort_topk_by_index(logits: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each position's top-k by vocabulary index: same data, far smaller after delta+zstd."""
    order = np.argsort(indices, axis=-1, kind="stable")
    return np.take_along_axis(logits, order, -1), np.take_along_axis(indices, order, -1)


def _check_writable(path: Path) -> None:
    parent = path.parent if not path.exists() else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise StoreError(f"cannot write the store at {path}: {parent} is not a writable folder")


def _build_skeleton(path: Path, manifest: Manifest, sequences: dict[str, dict[str, np.ndarray]]):
    _create_arrays(
        zarr.open_group(zarr.storage.LocalStore(path), mode="w", zarr_format=3), manifest, sequences
    )
    write_mark(path, STORE_MARK)
    write_manifest(path, manifest)


def _restore_skeleton(path: Path, manifest: Manifest) -> None:
    """Recreate array metadata lost in a partial copy; chunk files already there stay valid,
    and sequence arrays are checked and rewritten by `StoreWriter.repair`."""
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="a", zarr_format=3)
    _create_arrays(root, manifest, None)


def _create_arrays(root, manifest: Manifest, sequences: dict | None) -> None:
    root.attrs[SCHEMA_ATTR] = manifest.schema_version
    for split, shape in manifest.splits.items():
        group = root.require_group(split)
        for name, spec in shape.array_specs().items():
            if name in group:
                continue
            array = group.create_array(
                name,
                shape=tuple(spec["shape"]),
                chunks=tuple(spec["chunks"]),
                dtype=spec["dtype"],
                fill_value=0,
                **zarr_codec_args(spec),
            )
            if name in SEQUENCE_ARRAYS and sequences is not None:
                array[...] = sequences[split][name]


def _layout_matches(path: Path, manifest: Manifest) -> bool:
    """Is `path` a store group whose arrays have exactly the layout `manifest` describes?"""
    try:
        root = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
        if SCHEMA_ATTR not in root.attrs:
            return False
        for split, shape in manifest.splits.items():
            for name, spec in shape.array_specs().items():
                array = root[split][name]
                if (list(array.shape), list(array.chunks)) != (spec["shape"], spec["chunks"]):
                    return False
                if str(array.dtype) != spec["dtype"]:
                    return False
    except Exception:  # zarr raises several kinds for missing or broken metadata
        return False
    return True


def _read_or_restore_manifest(path: Path, manifest: Manifest, repaired: list[str]) -> Manifest:
    """The store's manifest; one lost or torn (partial copy, crash of a copy tool) is rewritten
    from the config's when the arrays have its layout. Records of another manifest stay void."""
    try:
        return read_manifest(path)
    except ManifestUnreadable:
        if not _layout_matches(path, manifest):
            raise StoreError(
                f"{path} has no readable manifest and its arrays do not match this config; "
                "pass --overwrite to rebuild it or choose another --store"
            ) from None
        write_manifest(path, manifest)
        repaired.append(f"{MANIFEST_FILE} was missing or torn: rewritten from the config")
        return read_manifest(path)


def open_store_for_writing(
    store: str | Path,
    manifest: Manifest,
    sequences: dict[str, dict[str, np.ndarray]],
    overwrite: bool = False,
    staging_dir: str | Path | None = None,
    storage_options: dict | None = None,
) -> StoreWriter:
    """Create the store, or reopen a matching one to resume; refuse one made differently.

    `store` is a local folder or a URL: a URL store is made in a local staging folder under
    `staging_dir` (one per URL) and the writer returned uploads each chunk once it is done."""
    store = local_spec(store)  # file:///x is the folder /x
    check_persistent(store)
    if is_url(store):
        from store.publish import PublishingWriter, staging_path  # it builds on StoreWriter

        if staging_dir is None:
            raise StoreError(f"writing {store} needs a local staging folder (staging_dir)")
        staged = _open_folder(staging_path(str(store), staging_dir), manifest, sequences, overwrite)
        return PublishingWriter(*staged, url=str(store), storage_options=storage_options or {})
    return StoreWriter(*_open_folder(store_folder(store), manifest, sequences, overwrite))


def store_folder(store: str | Path) -> Path:
    """The folder a local store path names: absolute (`--store .` inside a store names that
    store; a path needs a name to swap), and for a symlink the folder it points to (the store
    is replaced there and the link stays a link)."""
    path = Path(local_spec(store)).absolute()
    return path.resolve() if path.is_symlink() else path


def _open_folder(
    path: Path,
    manifest: Manifest,
    sequences: dict[str, dict[str, np.ndarray]],
    overwrite: bool = False,
) -> tuple[Path, Manifest, list[str]]:
    """Create the store folder, or reopen a matching one; returns its path, its manifest and
    what was repaired on the way."""
    if is_url(str(path)) or str(path).endswith(".zip"):
        raise StoreError(
            f"targets writes to a local folder or an object-store URL, not {path}: compute "
            "into a folder, then `dwq-pipeline store pack` it"
        )
    path = _checked_store_path(Path(path), overwrite)
    repaired: list[str] = []
    if path.exists() and not overwrite:
        existing = _read_or_restore_manifest(path, manifest, repaired)
        existing.check_current(path)
        differences = existing.differences(manifest)
        if differences:
            raise StoreMismatchError(
                f"store {path} was made differently ({describe_differences(differences)}); "
                "pass --overwrite to replace it or choose another --store"
            )
        if not _layout_matches(path, existing):
            _restore_skeleton(path, existing)
            repaired.append("array metadata was missing (a partial copy?): recreated")
        if not has_mark(path, STORE_MARK):  # a store from before the mark file
            write_mark(path, STORE_MARK)
        return path, existing, repaired
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _build_skeleton(partial, manifest, sequences)
        _swap_into_place(partial, path, overwrite)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise StoreError(f"cannot create the store at {path}: {exc.strerror or exc}") from exc
    return path, read_manifest(path), repaired


def _checked_store_path(path: Path, overwrite: bool) -> Path:
    """`path` if a store may be created or reopened there: new, an empty folder, or a store this
    program wrote; with --overwrite also only one holding nothing but its own entries."""
    if not path.name or path.name == "..":  # `--store .` names the folder by what it is
        path = path.resolve()
    outer = enclosing_store(path)
    if outer is not None:
        raise StoreError(
            f"{path} lies inside the store {outer}; choose a store path outside any store"
        )
    _check_writable(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a store folder; choose another store path")
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if path.exists() and not owns_store(path):  # never replaced, even with --overwrite
        raise StoreError(
            f"{path} exists and {not_a_store_because(path)}; choose another store path"
        )
    foreign = foreign_entries(path, is_store_key) if overwrite else []
    if foreign:
        raise StoreError(
            f"store {path} also holds {foreign[0]}, which dwq-pipeline did not write; "
            "--overwrite replaces only a store's own files: move it out first"
        )
    return path


def not_a_store_because(path: Path) -> str:
    """Why the existing `path` is no store of ours, naming what it is when it is ours."""
    kind = read_mark_kind(path)
    if kind == "run":
        return "is a tune run folder, not a store"
    if kind is not None:
        return f"is a dwq-pipeline {kind}, not a store"
    return f"is not a dwq-pipeline store (it has no {MARK_FILE})"


def _swap_into_place(partial: Path, path: Path, overwrite: bool) -> None:
    if overwrite and path.exists():
        if path.is_symlink():  # store_folder resolves links: never swap or delete through one
            raise StoreError(f"{path} is a symlink; name the store folder it points to")
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        os.replace(path, old)
        try:
            os.replace(partial, path)
        except OSError:
            os.replace(old, path)  # leave everything as it was
            raise
        remove_owned(old, is_store_key)  # a file someone put there meanwhile stays, in `old`
        fsync_path(path.parent)
        return
    try:
        os.rename(partial, path)
    except OSError:
        # Another process created the store first: use theirs (the caller checks it matches).
        shutil.rmtree(partial, ignore_errors=True)
        if not (path / MANIFEST_FILE).is_file():
            raise
    fsync_path(path.parent)


class StoreWriter:
    """Writes target chunks into an existing store."""

    def __init__(self, path: Path, manifest: Manifest, repaired: list[str] | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self.root = zarr.open_group(zarr.storage.LocalStore(self.path), mode="r+")
        self.repaired: list[str] = list(repaired or [])

    def lock_shard(self, index: int, count: int):
        """Held while a process computes shard index/count: a second one is refused."""
        lock = self.path / LOCKS_DIR / f"shard-{index}-of-{count}.lock"
        return hold_lock(lock, f"shard {index}/{count} of store {self.path}")

    def repair(
        self, sequences: dict[str, dict[str, np.ndarray]], chunks: dict[str, list[int]]
    ) -> list[str]:
        """Re-check what earlier runs left: token arrays are rewritten if damaged, and each of
        `chunks` that is recorded done but fails to decode or verify is marked not done, so
        that it is computed again. Returns what was repaired (with the manifest, if it was)."""
        from store.reader import StoreReader

        reader = StoreReader(self.path)
        records = reader.records()
        for split in self.manifest.splits:
            try:
                reader.sequences(split, verify=True)
            except StoreCorruptError:
                self._write_sequences(split, sequences[split])
                self.repaired.append(f"{split} token arrays were damaged: rewritten")
            for chunk in chunks.get(split, []):
                if chunk not in records[split]:
                    continue
                try:
                    reader.read_targets(split, chunk, verify=True)
                except StoreCorruptError as exc:
                    record_path(self.path, split, chunk).unlink(missing_ok=True)
                    reason = str(exc).split(";")[0]
                    self.repaired.append(f"{reason}: will be recomputed")
        return self.repaired

    def _write_sequences(self, split: str, values: dict[str, np.ndarray]) -> None:
        for name in SEQUENCE_ARRAYS:
            self.root[split][name][...] = values[name]
            for file in (self.path / split / name).rglob("*"):
                if file.is_file():
                    fsync_path(file)

    def done_chunks(self, split: str) -> set[int]:
        return set(read_records(self.path, self.manifest)[split])

    def shard_chunks(self, index: int, count: int) -> dict[str, list[int]]:
        """split -> the chunks shard `index`/`count` computes."""
        return {
            split: chunks_for_shard(shape.num_chunks, index, count)
            for split, shape in self.manifest.splits.items()
        }

    def missing_chunks(self, split: str, shard_index: int = 0, shard_count: int = 1) -> list[int]:
        total = self.manifest.splits[split].num_chunks
        return missing_chunks(total, self.done_chunks(split), shard_index, shard_count)

    def write_chunk(
        self, split: str, chunk: int, targets: dict[str, np.ndarray], shard: str
    ) -> None:
        """Write one chunk's target arrays (float32 logits, integer indices, tail values; stored
        in the manifest's encodings), make them durable, then record the chunk as done."""
        shape = self.manifest.splits[split]
        start, stop = shape.chunk_rows_range(chunk)
        values = shape.encode_targets(targets)
        values["topk_logits"], values["topk_indices"] = sort_topk_by_index(
            values["topk_logits"], values["topk_indices"]
        )
        group = self.root[split]
        for name in shape.target_arrays:
            expected = (stop - start, *group[name].shape[1:])
            if values[name].shape != expected:
                raise StoreError(
                    f"chunk {split}/{chunk} {name}: shape {values[name].shape} != {expected}"
                )
            group[name][start:stop] = values[name]
            self._fsync_chunk(split, name, chunk, group[name].ndim)
        checksums = {name: array_checksum(values[name]) for name in shape.target_arrays}
        record = ChunkRecord(split, chunk, shard, self.manifest.digest, checksums)
        write_record(self.path, record)

    def _fsync_chunk(self, split: str, name: str, chunk: int, ndim: int) -> None:
        fsync_path(self.path / chunk_key(split, name, chunk, ndim))


class BackgroundWriter:
    """Runs `StoreWriter.write_chunk` on a thread behind a bounded queue.

    The producer blocks only when `max_pending` chunks are already waiting, so the teacher keeps
    computing while earlier chunks are extracted, sorted, compressed and written. An error in the
    writer is raised in the producer on its next submit or on close.
    """

    def __init__(self, writer: StoreWriter, shard: str, max_pending: int = 2):
        self.writer = writer
        self.shard = shard
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                split, chunk, make_targets = item
                try:
                    self.writer.write_chunk(split, chunk, make_targets(), self.shard)
                except BaseException as exc:  # handed to the producer thread
                    self.error = exc

    def submit(
        self, split: str, chunk: int, make_targets: Callable[[], dict[str, np.ndarray]]
    ) -> None:
        """Queue a chunk; `make_targets` runs on the writer thread (e.g. top-k extraction)."""
        self._raise_if_failed()
        self.queue.put((split, chunk, make_targets))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            if isinstance(error, OSError):
                raise StoreError(
                    f"writing the store failed: {error.strerror or error}; every chunk finished "
                    "before is kept: fix the disk or permissions and re-run to resume"
                ) from error
            raise error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is None:
            self.close()
        else:  # finish what is queued (it is valid work), then let the original error through
            self.queue.put(None)
            self.thread.join()


def merge_stores(out_path: Path, inputs: Iterable[str | Path]) -> dict[str, int]:
    """Copy done chunks from stores made with the same manifest into `out_path`."""
    from store.reader import StoreReader

    inputs = list(inputs)
    if not inputs:
        raise StoreError("store merge needs at least one input store")
    if not str(out_path).strip():
        raise StoreError("the merged store's path must not be empty")
    if is_url(str(out_path)):
        raise StoreError(
            f"store merge writes a local folder, not {out_path}: merge into a folder, then "
            "copy or upload it"
        )
    out_path = store_folder(out_path)
    for source in inputs:
        if paths_overlap(out_path, source):
            raise StoreError(
                f"the merged store {out_path} must not be, contain or lie inside the input "
                f"{source}: merge into a new store"
            )
    readers = [StoreReader(p) for p in inputs]
    base = readers[0]
    for reader in readers[1:]:
        differences = base.manifest.differences(reader.manifest)
        if differences:
            raise StoreMismatchError(
                f"{reader.location} differs from {base.location}: "
                f"{describe_differences(differences)}"
            )
    sequences = {split: base.sequences(split) for split in base.manifest.splits}
    writer = StoreWriter(*_open_folder(out_path, base.manifest, sequences))
    copied = {split: 0 for split in base.manifest.splits}
    for reader in readers:
        for split, records in reader.records().items():
            for chunk in sorted(set(records) - writer.done_chunks(split)):
                targets = reader.read_targets(split, chunk, verify=True)
                targets["topk_logits"] = reader.logits_as_float32(split, targets["topk_logits"])
                writer.write_chunk(split, chunk, targets, records[chunk].shard)
                copied[split] += 1
    return copied
