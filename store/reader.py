"""Reading a store: sequences, target chunks (checked against their records), and decoding."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import zarr

from store.errors import ManifestUnreadable, StoreCorruptError, StoreError
from store.layout import (
    SEQUENCE_ARRAYS,
    chunk_key,
    record_key,
    sequences_digest,
)
from store.location import StoreLocation, open_location
from store.manifest import Manifest, read_manifest
from store.records import (
    ChunkRecord,
    array_checksum,
    missing_chunks,
    parse_record,
    read_records,
)


class StoreReader:
    """A store's manifest, records, sequences and chunks, from a folder, a zip or a URL."""

    def __init__(self, store: str | Path | StoreLocation, storage_options: dict | None = None):
        self.location = open_location(store, storage_options)
        try:  # read first: on a URL, only a read tells "absent" from "unreachable" or "denied"
            self.manifest: Manifest = read_manifest(self.location)
        except ManifestUnreadable:
            if not self.location.exists():
                raise StoreError(
                    f"store {self.location} does not exist; run `dwq-pipeline targets` first"
                ) from None
            raise
        self.manifest.check_current(self.location)
        try:
            self.root = self.location.call(
                lambda: zarr.open_group(self.location.zarr_store(), mode="r")
            )
        except StoreError:
            raise
        except Exception as exc:  # zarr raises several kinds for a broken group
            raise StoreCorruptError(
                f"store {self.location} cannot be opened by zarr ({type(exc).__name__}); copy it "
                "again or re-run `dwq-pipeline targets` with its config to repair it"
            ) from exc
        self._records: dict[str, dict[int, ChunkRecord]] | None = None

    def read_targets_when_ready(
        self,
        split: str,
        chunk: int,
        timeout_s: float,
        poll_s: float = 1.0,
        abandoned: threading.Event | None = None,
    ) -> dict[str, np.ndarray] | None:
        """Like read_targets, but for a store still being filled or copied: wait until the chunk
        is recorded done and its files read back whole (a copy may bring them in any order).
        None when `abandoned` is set first (the reader is gone: nobody waits for the chunk)."""
        deadline = time.monotonic() + timeout_s
        abandoned = abandoned or threading.Event()
        while not abandoned.is_set():
            self._pick_up_record(split, chunk)
            try:
                return self.read_targets(split, chunk, verify=True)
            except StoreCorruptError as exc:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"waited {timeout_s:.0f}s for chunk {split}/{chunk} of {self.location} "
                        f"({str(exc).split(';')[0]}); is targets or the copy still running? "
                        "re-run to resume"
                    ) from exc
            abandoned.wait(poll_s)
        return None

    def _pick_up_record(self, split: str, chunk: int) -> None:
        """Read one chunk's record if it arrived since the records were listed."""
        if chunk in self.records()[split]:
            return
        record = parse_record(
            self.location.read_bytes(record_key(split, chunk)), split, self.manifest
        )
        if record is not None and record.chunk == chunk:
            self.records()[split][chunk] = record

    def records(self, refresh: bool = False) -> dict[str, dict[int, ChunkRecord]]:
        if self._records is None or refresh:
            self._records = read_records(self.location, self.manifest)
        return self._records

    def missing_chunks(self, split: str) -> list[int]:
        """The chunks of `split` not recorded done."""
        return missing_chunks(self.manifest.splits[split].num_chunks, self.records()[split])

    def sequences(self, split: str, verify: bool = True) -> dict[str, np.ndarray]:
        """A split's token rows, lengths and prompt offsets, checked against the manifest."""
        try:
            values = self.location.call(
                lambda: {name: self._array(split, name)[...] for name in SEQUENCE_ARRAYS}
            )
        except StoreError:
            raise
        except Exception as exc:  # a truncated or garbled chunk fails in the codec
            raise StoreCorruptError(
                f"the {split} token arrays of {self.location} cannot be decoded; "
                "re-run `dwq-pipeline targets` with the same config to repair them"
            ) from exc
        if verify and sequences_digest(values) != self.manifest.data.get(f"{split}_digest"):
            raise StoreCorruptError(
                f"the {split} token arrays of {self.location} differ from the manifest's digest; "
                "re-run `dwq-pipeline targets` with the same config to repair them"
            )
        return values

    def missing_chunk_files(self, split: str, chunk: int) -> list[str]:
        """Chunk files that are absent, as after an interrupted copy."""
        keys = [
            chunk_key(split, name, chunk, self._array(split, name).ndim)
            for name in self.manifest.splits[split].target_arrays
        ]
        return [key for key in keys if not self.location.exists(key)]

    def _array(self, split: str, name: str):
        """One array of a split; unreadable metadata (zarr.json) is named, not a traceback."""
        try:
            return self.location.call(lambda: self.root[split][name], f"{split}/{name}")
        except StoreError:
            raise
        except Exception as exc:  # zarr raises several kinds for missing or broken metadata
            raise StoreCorruptError(
                f"the metadata of {split}/{name} in {self.location} is unreadable "
                f"({type(exc).__name__}); copy the store again or re-run `dwq-pipeline targets` "
                "with its config to repair it"
            ) from exc

    def read_targets(self, split: str, chunk: int, verify: bool = True) -> dict[str, np.ndarray]:
        """A chunk's stored target arrays (logits in their stored dtype), checksum-verified."""
        shape = self.manifest.splits[split]
        start, stop = shape.chunk_rows_range(chunk)
        try:
            values = self.location.call(
                lambda: {name: self._array(split, name)[start:stop] for name in shape.target_arrays}
            )
        except StoreError:
            raise
        except Exception as exc:  # a truncated or garbled chunk fails in the codec
            self._raise_if_files_missing(split, chunk)
            raise StoreCorruptError(
                f"chunk {split}/{chunk} cannot be decoded ({type(exc).__name__}); "
                "re-run `dwq-pipeline targets` to recompute it"
            ) from exc
        if verify:
            record = self.records()[split].get(chunk)
            if record is None:
                raise StoreCorruptError(f"chunk {split}/{chunk} is not complete in {self.location}")
            if set(record.checksums) != set(shape.target_arrays):
                raise StoreCorruptError(
                    f"chunk {split}/{chunk}'s record does not name the store's arrays; "
                    "re-run `dwq-pipeline targets` to recompute it"
                )
            for name, expected in record.checksums.items():
                if array_checksum(values[name]) != expected:
                    self._raise_if_files_missing(split, chunk)
                    raise StoreCorruptError(
                        f"chunk {split}/{chunk} {name} fails its checksum; "
                        "re-run `dwq-pipeline targets` to recompute it"
                    )
        return values

    def _raise_if_files_missing(self, split: str, chunk: int) -> None:
        """After a chunk failed: name a missing file (zarr reads one as zeros), if that is why."""
        missing = self.missing_chunk_files(split, chunk)
        if missing:
            raise StoreCorruptError(
                f"chunk {split}/{chunk} has no {missing[0]} file (an interrupted copy?); "
                "copy it again or re-run `dwq-pipeline targets` to recompute it"
            )

    def logits_as_float32(self, split: str, stored: np.ndarray) -> np.ndarray:
        return self.manifest.splits[split].decode_logits(stored)


class _ChunkCache:
    """The few most recently decoded chunks: a batch's rows may span two of them."""

    def __init__(
        self,
        reader: StoreReader,
        split: str,
        size: int = 2,
        wait_s: float | None = None,
        abandoned: threading.Event | None = None,
    ):
        self.reader, self.split, self.size, self.wait_s = reader, split, size, wait_s
        self.abandoned = abandoned
        self.chunks: dict[int, dict[str, np.ndarray]] = {}

    def rows(self, row_ids: list[int]) -> dict[str, np.ndarray] | None:
        """The rows' target arrays, or None when abandoned while waiting for a chunk."""
        shape = self.reader.manifest.splits[self.split]
        picked: dict[str, list[np.ndarray]] = {name: [] for name in shape.target_arrays}
        for row in row_ids:
            chunk, offset = divmod(row, shape.chunk_rows)
            values = self._get(chunk)
            if values is None:
                return None
            for name in shape.target_arrays:
                picked[name].append(values[name][offset])
        return {name: np.stack(parts) for name, parts in picked.items()}

    def _get(self, chunk: int) -> dict[str, np.ndarray] | None:
        if chunk not in self.chunks:
            if self.wait_s is None:
                values = self.reader.read_targets(self.split, chunk, verify=True)
            else:
                values = self.reader.read_targets_when_ready(
                    self.split, chunk, self.wait_s, abandoned=self.abandoned
                )
                if values is None:
                    return None
            values["topk_logits"] = self.reader.logits_as_float32(self.split, values["topk_logits"])
            values["topk_indices"] = values["topk_indices"].astype(np.int32)
            if "tail_samples" in values:
                values["tail_samples"] = values["tail_samples"].astype(np.int32)
            if len(self.chunks) >= self.size:
                self.chunks.pop(next(iter(self.chunks)))
            self.chunks[chunk] = values
        return self.chunks[chunk]


def stream_batches(
    reader: StoreReader,
    split: str,
    batches: Iterable[list[int]],
    prefetch: int = 2,
    wait_s: float | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield each batch's target arrays (float32 logits, int32 indices), rows in the given order.

    Chunks are read, checksum-verified and decoded on a background thread that stays at most
    `prefetch` batches ahead, so memory is bounded whatever the store's size. With `wait_s`, a
    chunk not yet recorded done is waited for (up to wait_s seconds) instead of refused."""
    out: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item) -> bool:
        """Block until there is room, unless the consumer has gone away."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        cache = _ChunkCache(reader, split, wait_s=wait_s, abandoned=stop)
        try:
            for rows in batches:
                values = cache.rows(rows)
                if values is None or not put(values):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=produce, name="store-prefetch", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


_END = object()
