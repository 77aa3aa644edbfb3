"""Reading a store: sequences, target chunks (checked against their records), and decoding."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from store.errors import StoreCorruptError, StoreError
from store.layout import (
    SEQUENCE_ARRAYS,
    TARGET_ARRAYS,
    bfloat16_bits_to_float32,
    chunk_key,
    sequences_digest,
)
from store.manifest import ChunkRecord, Manifest, read_manifest, read_records


class StoreReader:
    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"store {self.path} does not exist; run `dwq-pipeline targets` first")
        self.manifest: Manifest = read_manifest(self.path)
        try:
            self.root = zarr.open_group(
                zarr.storage.LocalStore(self.path, read_only=True), mode="r"
            )
        except Exception as exc:  # zarr raises several kinds for a broken group
            raise StoreCorruptError(
                f"store {self.path} cannot be opened by zarr ({type(exc).__name__}); copy it "
                "again or re-run `dwq-pipeline targets` with its config to repair it"
            ) from exc
        self._records: dict[str, dict[int, ChunkRecord]] | None = None

    def records(self, refresh: bool = False) -> dict[str, dict[int, ChunkRecord]]:
        if self._records is None or refresh:
            self._records = read_records(self.path, self.manifest)
        return self._records

    def sequences(self, split: str, verify: bool = True) -> dict[str, np.ndarray]:
        """A split's token rows, lengths and prompt offsets, checked against the manifest."""
        try:
            values = {name: self.root[split][name][...] for name in SEQUENCE_ARRAYS}
        except Exception as exc:  # a truncated or garbled chunk fails in the codec
            raise StoreCorruptError(
                f"the {split} token arrays of {self.path} cannot be decoded; "
                "re-run `dwq-pipeline targets` with the same config to repair them"
            ) from exc
        if verify and sequences_digest(values) != self.manifest.data.get(f"{split}_digest"):
            raise StoreCorruptError(
                f"the {split} token arrays of {self.path} differ from the manifest's digest; "
                "re-run `dwq-pipeline targets` with the same config to repair them"
            )
        return values

    def missing_chunk_files(self, split: str, chunk: int) -> list[str]:
        """Chunk files that are absent, as after an interrupted copy."""
        keys = [
            chunk_key(split, name, chunk, self.root[split][name].ndim) for name in TARGET_ARRAYS
        ]
        return [key for key in keys if not (self.path / key).is_file()]

    def read_targets(self, split: str, chunk: int, verify: bool = True) -> dict[str, np.ndarray]:
        """A chunk's stored target arrays (logits in their stored dtype), checksum-verified."""
        from store.writer import array_checksum

        start, stop = self.manifest.splits[split].chunk_rows_range(chunk)
        missing = self.missing_chunk_files(split, chunk) if verify else []
        if missing:
            raise StoreCorruptError(
                f"chunk {split}/{chunk} has no {missing[0]} file (an interrupted copy?); "
                "copy it again or re-run `dwq-pipeline targets` to recompute it"
            )
        try:
            values = {name: self.root[split][name][start:stop] for name in TARGET_ARRAYS}
        except Exception as exc:  # a truncated or garbled chunk fails in the codec
            raise StoreCorruptError(
                f"chunk {split}/{chunk} cannot be decoded ({type(exc).__name__}); "
                "re-run `dwq-pipeline targets` to recompute it"
            ) from exc
        if verify:
            record = self.records()[split].get(chunk)
            if record is None:
                raise StoreCorruptError(f"chunk {split}/{chunk} is not complete in {self.path}")
            for name, expected in record.checksums.items():
                if array_checksum(values[name]) != expected:
                    raise StoreCorruptError(
                        f"chunk {split}/{chunk} {name} fails its checksum; "
                        "re-run `dwq-pipeline targets` to recompute it"
                    )
        return values

    def logits_as_float32(self, split: str, stored: np.ndarray) -> np.ndarray:
        if self.manifest.splits[split].logits_dtype == "bfloat16":
            return bfloat16_bits_to_float32(stored)
        return stored.astype(np.float32)


class _ChunkCache:
    """The few most recently decoded chunks: a batch's rows may span two of them."""

    def __init__(self, reader: StoreReader, split: str, size: int = 2):
        self.reader, self.split, self.size = reader, split, size
        self.chunks: dict[int, dict[str, np.ndarray]] = {}

    def rows(self, row_ids: list[int]) -> dict[str, np.ndarray]:
        shape = self.reader.manifest.splits[self.split]
        picked: dict[str, list[np.ndarray]] = {name: [] for name in TARGET_ARRAYS}
        for row in row_ids:
            chunk, offset = divmod(row, shape.chunk_rows)
            values = self._get(chunk)
            for name in TARGET_ARRAYS:
                picked[name].append(values[name][offset])
        return {name: np.stack(parts) for name, parts in picked.items()}

    def _get(self, chunk: int) -> dict[str, np.ndarray]:
        if chunk not in self.chunks:
            values = self.reader.read_targets(self.split, chunk, verify=True)
            values["topk_logits"] = self.reader.logits_as_float32(self.split, values["topk_logits"])
            values["topk_indices"] = values["topk_indices"].astype(np.int32)
            if len(self.chunks) >= self.size:
                self.chunks.pop(next(iter(self.chunks)))
            self.chunks[chunk] = values
        return self.chunks[chunk]


def stream_batches(
    reader: StoreReader, split: str, batches: list[list[int]], prefetch: int = 2
) -> Iterator[dict[str, np.ndarray]]:
    """Yield each batch's target arrays (float32 logits, int32 indices), rows in the given order.

    Chunks are read, checksum-verified and decoded on a background thread that stays at most
    `prefetch` batches ahead, so memory is bounded whatever the store's size."""
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
        cache = _ChunkCache(reader, split)
        try:
            for rows in batches:
                if not put(cache.rows(rows)):
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
